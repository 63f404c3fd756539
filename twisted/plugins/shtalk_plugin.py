"""twistd drop-in for the shtalk server; kept tiny so plugin scans stay cheap."""

from twisted.application.service import ServiceMaker

shtalk = ServiceMaker(  # type: ignore[no-untyped-call]
    "shtalk",
    "shtalk.server.tap",
    "shtalk: end-to-end encrypted terminal chat server (TLS, JSON lines)",
    "shtalk",
)
