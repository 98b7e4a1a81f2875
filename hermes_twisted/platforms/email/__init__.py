"""
Email: IMAP (with IDLE) in, SMTP submission out, on C{twisted.mail}.

  adapter.py   the adapter: the IMAP session loop, admission, the reply
  imap.py      C{IMAP4Client} with IDLE, the greeting and the end as Deferreds, peeking fetch
  smtp.py      one submission with C{ESMTPSenderFactory}: STARTTLS (587) or implicit TLS (465)
  message.py   parsing, automated-mail detection, the sender gate, reply threading headers
  cursor.py    the persisted (UIDVALIDITY, last UID) of the inbox
"""
