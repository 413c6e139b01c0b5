#!lua
-- Cancel a job that is not terminal yet: its cancelled record wins the result key, so
-- the worker's later write finds it taken and only acknowledges. The record (and the
-- hash) are kept until a worker has taken the job's entry — at most HOLD seconds —,
-- which then shortens them to the result TTL: a cancelled job whose record had expired
-- while its entry still waited would otherwise be computed and answered (AUDIT D5).
--
-- KEYS[1]  inferq:{m}:job:<id>     the record hash
-- KEYS[2]  inferq:{m}:result:<id>  the terminal record
-- KEYS[3]  its reply list (or the hash again when it has none)
-- ARGV[1] finished_ms   ARGV[2] result TTL (s)   ARGV[3] done channel   ARGV[4] job id
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
local hold = math.max(ttl, 7 * 24 * 3600)
redis.call('SET', result, json, 'EX', hold)
redis.call('EXPIRE', rec, hold, 'NX')
if KEYS[3] ~= rec then
  redis.call('RPUSH', KEYS[3], json)
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, json}
