#!lua
-- Enqueue one job atomically: the record and the stream entry, or nothing.
-- A `#!lua` script without `no-writes` is refused whole under OOM, so a full Redis
-- never leaves half a job.
--
-- KEYS[1]  inferq:{m}:job:<id>   the job record (hash)
-- KEYS[2]  inferq:{m}:jobs       the jobs stream
-- KEYS[3]  inferq:{m}:result:<id> the terminal record (JSON string)
-- ARGV[1]  sha256 of the request (idempotency: same id + same body = same job)
-- ARGV[2]  max_queue: refuse when the stream already holds this many entries
-- ARGV[3]  enqueued_ms
-- ARGV[4]  model name
-- ARGV[5]  resolved version
-- ARGV[6]  reply_to key or ''
-- ARGV[7..] the entry's field/value pairs for XADD
-- Returns {0, entry_id} created | {1, status} same job exists | {2} id taken by
-- another body | {3, length} backlog full
local rec, stream = KEYS[1], KEYS[2]
local done = redis.call('GET', KEYS[3])
if not done and redis.call('PTTL', rec) >= 0 then
  -- Only an ended job's hash has a TTL: its result has expired, the id is free again.
  redis.call('DEL', rec)
end
local existing = redis.call('HGET', rec, 'body_sha')
if existing and existing == ARGV[1] then
  local status = done and string.match(done, '"status":"(%a+)"')
  return {1, status or redis.call('HGET', rec, 'status') or 'queued'}
end
if existing or done or redis.call('EXISTS', rec) == 1 then
  return {2}
end
local len = redis.call('XLEN', stream)
if len >= tonumber(ARGV[2]) then
  return {3, len}
end
local entry = {}
for i = 7, #ARGV do
  entry[#entry + 1] = ARGV[i]
end
local eid = redis.call('XADD', stream, '*', unpack(entry))
redis.call('HSET', rec, 'status', 'queued', 'model', ARGV[4], 'version', ARGV[5],
  'enqueued_ms', ARGV[3], 'attempts', 0, 'body_sha', ARGV[1])
if ARGV[6] ~= '' then
  redis.call('HSET', rec, 'reply_to', ARGV[6])
end
return {0, eid}
