from twisted.application.service import ServiceMaker

hermesGateway = ServiceMaker("Hermes gateway", "hermes_twisted.tap", "Chat platforms <-> remote Hermes agent gateway", "hermes-gateway")
