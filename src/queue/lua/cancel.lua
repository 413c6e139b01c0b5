#!lua
-- Cancel a job that is not terminal yet: its cancelled record wins the result key, so
-- the worker's later write finds it taken and only acknowledges.
--
-- KEYS[1]  inferq:{m}:job:<id>     the record hash
-- KEYS[2]  inferq:{m}:result:<id>  the terminal record
-- KEYS[3]  its reply list (or the hash again when it has none)
-- KEYS[4]  inferq:{m}:jobs        the stream
-- KEYS[5]  inferq:{m}:inflight    entry id -> job id index
-- ARGV[1] finished_ms   ARGV[2] result TTL (s)   ARGV[3] done channel   ARGV[4] job id
-- ARGV[5] group
-- Returns {0} unknown job | {1, record JSON} cancelled now | {2, status} already terminal
local rec, result = KEYS[1], KEYS[2]
local done = redis.call('GET', result)
if done then
  return {2, string.match(done, '"status":"(%a+)"') or 'succeeded'}
end
if redis.call('PTTL', rec) >= 0 then
  -- Only an ended job's hash has a TTL: its result has expired, the job is forgotten.
  return {0}
end
local h = redis.call('HGETALL', rec)
local known = false
for i = 1, #h, 2 do
  if h[i] == 'status' then known = true end
end
if not known then
  -- No record, or only a retry note on a direct producer's job: unknown, as before
  -- a worker takes it.
  return {0}
end
local r = {id = ARGV[4], status = 'cancelled', finished_ms = tonumber(ARGV[1]),
  error = 'cancelled by the client', error_kind = 'cancelled'}
local numbers = {version = true, enqueued_ms = true, started_ms = true, attempts = true}
for i = 1, #h, 2 do
  local f, v = h[i], h[i + 1]
  if numbers[f] then r[f] = tonumber(v) elseif f == 'model' then r[f] = v end
end
local json = cjson.encode(r)
local ttl = tonumber(ARGV[2])
redis.call('SET', result, json, 'EX', ttl)
redis.call('EXPIRE', rec, ttl, 'NX')
if KEYS[3] ~= rec then
  redis.call('RPUSH', KEYS[3], json)
  redis.call('EXPIRE', KEYS[3], ttl)
end
-- The entry goes too (acknowledged, deleted, unindexed): once the cancelled record
-- expires, nothing is left that a worker could compute, or answer as lost.
local eid = redis.call('HGET', rec, 'entry')
if eid then
  redis.call('XACK', KEYS[4], ARGV[5], eid)
  redis.call('XDEL', KEYS[4], eid)
  redis.call('HDEL', KEYS[5], eid)
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, json}
