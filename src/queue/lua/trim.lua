#!lua
-- Trim acknowledged entries without ever passing a pending or undelivered one
-- (on Redis 7.0, XTRIM drops unacknowledged entries too).
--
-- KEYS[1]  inferq:{m}:jobs
-- ARGV[1]  group
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
return redis.call('XTRIM', stream, 'MINID', '~', floor)
