#!lua
-- Trim acknowledged entries without ever passing a pending or undelivered one
-- (on Redis 7.0, XTRIM drops unacknowledged entries too).
--
-- KEYS[1]  inferq:{m}:jobs
-- ARGV[1]  group   ARGV[2] most entries to remove in this call
-- Returns the number of entries removed.
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then
  return 0
end
local groups = redis.call('XINFO', 'GROUPS', stream)
local floor = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  if info['name'] == ARGV[1] then
    floor = info['last-delivered-id']
  end
end
if not floor or floor == '0-0' then
  return 0
end
local pending = redis.call('XPENDING', stream, ARGV[1])
if pending[1] > 0 then
  floor = pending[2]
end
-- Without LIMIT, `~` trims at most 100 x stream-node-max-entries (10,000) entries a
-- call, which a fast producer outruns (AUDIT D12); a larger bound keeps one call short.
return redis.call('XTRIM', stream, 'MINID', '~', floor, 'LIMIT', ARGV[2])
