#!lua
-- Cancel a job that is not terminal yet. Its outputs are never shown: the worker's
-- later terminal write finds the record terminal and only acknowledges.
--
-- KEYS[1]  inferq:{m}:job:<id>  the record
-- KEYS[2]  its reply list (or the record again when it has none)
-- ARGV[1] finished_ms   ARGV[2] result TTL (s)   ARGV[3] done channel   ARGV[4] job id
-- Returns {0} unknown job | {1, record JSON} cancelled now | {2, status} already terminal
local rec = KEYS[1]
local st = redis.call('HGET', rec, 'status')
if not st then
  return {0}
end
if st ~= 'queued' and st ~= 'running' then
  return {2, st}
end
redis.call('HSET', rec, 'status', 'cancelled', 'finished_ms', ARGV[1],
  'error', 'cancelled by the client', 'error_kind', 'cancelled')
redis.call('EXPIRE', rec, tonumber(ARGV[2]))
local h = redis.call('HGETALL', rec)
local r = {id = ARGV[4]}
local numbers = {version = true, enqueued_ms = true, started_ms = true, finished_ms = true, attempts = true}
local shown = {status = true, model = true, error = true, error_kind = true}
for i = 1, #h, 2 do
  local f, v = h[i], h[i + 1]
  if numbers[f] then r[f] = tonumber(v) elseif shown[f] then r[f] = v end
end
local json = cjson.encode(r)
if KEYS[2] ~= rec then
  redis.call('RPUSH', KEYS[2], json)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, json}
