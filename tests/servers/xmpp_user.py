"""
A human XMPP user for the tests, played by slixmpp (email-xmpp.md §5.3) in its own asyncio
process, so it never shares the Twisted reactor under test.

    python -m tests.servers.xmpp_user JID PASSWORD HOST PORT CA_FILE [--no-corrections]

With C{--no-corrections} the client does not load XEP-0308, so its disco#info does not
announce message correction (an older client); it still reports a C{<replace/>} it receives.

It reads one JSON command per line on stdin and writes one JSON event per line on stdout:

  commands: {"op": "send", "to": JID, "body": TEXT}
            {"op": "join", "room": ROOM, "nick": NICK}
            {"op": "groupchat", "room": ROOM, "body": TEXT}
            {"op": "quit"}
  events:   {"ev": "ready"}, {"ev": "joined", "room": ROOM}
            {"ev": "message", "type", "from", "id", "body", "replace", "origin_id",
             "chatstate"}   (one per message slixmpp reports, with its chat state)
            {"ev": "chatstate", "state", "from", "type", "with_body"}
            {"ev": "error", "text": ...}
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import slixmpp

NS_CORRECT = "urn:xmpp:message-correct:0"
NS_SID = "urn:xmpp:sid:0"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class User(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str, *, corrections: bool = True) -> None:
        super().__init__(jid, password)
        plugins = ["xep_0030", "xep_0045", "xep_0085", "xep_0198", "xep_0199", "xep_0359"]
        if corrections:
            plugins.append("xep_0308")  # announces urn:xmpp:message-correct:0 in disco#info
        for plugin in plugins:
            self.register_plugin(plugin)
        self.add_event_handler("session_start", self.started)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("groupchat_message", self.on_message)
        for state in ("active", "composing", "paused", "inactive", "gone"):
            self.add_event_handler(f"chatstate_{state}",
                                   lambda msg, state=state: self.on_chatstate(msg, state))

    async def started(self, _: Any) -> None:
        self.send_presence()
        await self.get_roster()
        emit({"ev": "ready"})

    def on_chatstate(self, msg: Any, state: str) -> None:
        emit({"ev": "chatstate", "state": state, "from": str(msg["from"]),
              "type": msg["type"], "with_body": bool(msg["body"])})

    def on_message(self, msg: Any) -> None:
        xml = msg.xml
        replace = xml.find(f"{{{NS_CORRECT}}}replace")
        origin = xml.find(f"{{{NS_SID}}}origin-id")
        state = next((child.tag.split("}", 1)[1] for child in xml
                      if child.tag.startswith(f"{{{NS_CHATSTATES}}}")), None)
        body = xml.find("{jabber:client}body")
        emit({"ev": "message", "type": msg["type"], "from": str(msg["from"]),
              "id": msg["id"] or None,
              "body": body.text if body is not None else None,
              "replace": replace.get("id") if replace is not None else None,
              "origin_id": origin.get("id") if origin is not None else None,
              "chatstate": state})


async def commands(user: User) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "send":
                user.send_message(mto=cmd["to"], mbody=cmd["body"], mtype="chat")
            elif op == "groupchat":
                user.send_message(mto=cmd["room"], mbody=cmd["body"], mtype="groupchat")
            elif op == "join":
                await user.plugin["xep_0045"].join_muc_wait(cmd["room"], cmd["nick"],
                                                            maxstanzas=0, timeout=20)
                emit({"ev": "joined", "room": cmd["room"]})
            elif op == "quit":
                break
        except Exception as e:  # report, keep serving the test
            emit({"ev": "error", "text": repr(e)})
    user.disconnect()


def main() -> None:
    jid, password, host, port, ca_file = sys.argv[1:6]
    user = User(jid, password, corrections="--no-corrections" not in sys.argv[6:])
    user.ca_certs = ca_file
    user.connect(host, int(port))
    loop = asyncio.get_event_loop()
    loop.run_until_complete(commands(user))


if __name__ == "__main__":
    main()
