"""twisted.cred for shtalk: password and token checkers, the realm, tokens and password hashing."""
