"""Lua scripts run inside Redis, so each presence change is one atomic step.

`Script.run` sends ``EVALSHA`` and falls back to ``EVAL`` once if Redis does not know
the script yet (a restarted Redis forgets them).  Every key a script touches is named
from the cluster's prefix; a few scripts build key names inside Lua (the presence hashes
of a dead process's users), which a single Redis allows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import inlineCallbacks


class Script:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 (Redis's script id)

    @inlineCallbacks
    def run(self, redis: Any, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            reply = yield redis.evalsha(self.sha, list(keys), [str(a) for a in args])
        except txredisapi.ScriptDoesNotExist:
            reply = yield redis.eval(self.text, list(keys), [str(a) for a in args])
        return reply


#: A device of the user is served by this process (field ARGV[1] = "node|device").
#: Returns how many fields the user had before: 0 = first device anywhere.
DEVICE_UP = Script("""
local n = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return n
""")

#: The device is no longer served here; ARGV[2] = '1' if none of the user's are.
#: Returns the fields left (0 = last device anywhere), or -1 if the field was already
#: gone (a survivor cleared it and announced the user).
DEVICE_DOWN = Script("""
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[2] == '1' then redis.call('SREM', KEYS[2], ARGV[3]) end
if removed == 0 then return -1 end
return redis.call('HLEN', KEYS[1])
""")

#: The 1-based positions of KEYS that exist.
EXISTING = Script("""
local found = {}
for i, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then table.insert(found, i) end
end
return found
""")

#: A heartbeat: the node's key with its expiry, and its name in the registry.
#: Returns 1 if the registry had it (0: first beat, or a survivor cleared it).
HEARTBEAT = Script("""
local was = redis.call('SISMEMBER', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return was
""")

#: Registered nodes (other than ARGV[2]) whose heartbeat key expired.
DEAD_NODES = Script("""
local dead = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if n ~= ARGV[2] and redis.call('EXISTS', ARGV[1] .. n) == 0 then
    table.insert(dead, n)
  end
end
return dead
""")

#: Remove every presence field of node ARGV[2] (KEYS[1]: its users, KEYS[2]: the
#: registry); returns the users left with no device anywhere.
REAP = Script("""
local gone = {}
local mark = ARGV[2] .. '|'
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. uid
  local fields = redis.call('HKEYS', key)
  local had = 0
  for _, f in ipairs(fields) do
    if string.sub(f, 1, #mark) == mark then
      redis.call('HDEL', key, f)
      had = 1
    end
  end
  if had == 1 and redis.call('EXISTS', key) == 0 then table.insert(gone, uid) end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return gone
""")
