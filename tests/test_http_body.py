import pytest
import pytest_twisted
import treq.client
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hermes_twisted.net.body import BodyTooLarge, read_body


class Slow(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.gone = Deferred()

    def render_GET(self, request):
        request.write(b"x" * 100)
        request.notifyFinish().addBoth(lambda _: self.gone.callback(None))
        return NOT_DONE_YET


@pytest.fixture
def server():
    resource = Slow()
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource)))
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield resource, port, treq.client.HTTPClient(Agent(reactor, pool=pool))
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest_twisted.ensureDeferred
async def test_cancel_closes_the_connection(server):
    resource, port, http = server
    response = await http.get(f"http://127.0.0.1:{port.getHost().port}/", unbuffered=True)
    d = read_body(response)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await resource.gone  # the server saw the client go away


@pytest_twisted.ensureDeferred
async def test_cap_fails_and_closes(server):
    resource, port, http = server
    response = await http.get(f"http://127.0.0.1:{port.getHost().port}/", unbuffered=True)
    with pytest.raises(BodyTooLarge):
        await read_body(response, max_bytes=50)
    await resource.gone
