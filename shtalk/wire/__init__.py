"""The shtalk wire protocol, sans-IO, shared by the server and the client.

Nothing in this package touches a socket, a reactor or a key.  What is where:

* `errors`: the error codes and `ProtocolError`;
* `limits`: the protocol version and the size ceilings;
* `fields`: validators (what a value on the wire may be);
* `records`, `shapes`: typed records built on them, and the shapes messages share;
* `requests`, `pushes`: one record per request and per push, with the per-direction
  sets (`REQUEST_MAP`, `PRE_AUTH`, `PUSH_MAP`);
* `schema`: the validation table of every request, read off the request records;
* `frames`: JSON-lines framing for both sides (`parse_line` for the server, request
  lines and server lines for the client);
* `names`, `passwords`: the naming rules and the password policy.

This module imports nothing, so a caller that needs only `shtalk.wire.errors` (the
terminal UI before its first frame) pays for nothing else.
"""
