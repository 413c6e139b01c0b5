#!lua
-- Mark a batch's jobs running (skipping those already terminal) and index each
-- entry id to its job id, so an entry trimmed away while pending can still be
-- answered. Sent pipelined; the worker does not wait for it.
--
-- KEYS[1]      inferq:{m}:inflight   hash entry id -> job id
-- KEYS[2..n+1] inferq:{m}:job:<id>   one record per job
-- ARGV[1] started_ms   ARGV[2] model
-- then per job, 5 values: entry id, job id, version, attempts, reply_to or ''
-- Returns the number of records marked.
local marked = 0
local terminal = {succeeded = true, failed = true, expired = true, cancelled = true}
local index = {}
for i = 2, #KEYS do
  local a = 3 + (i - 2) * 5
  local rec = KEYS[i]
  if not terminal[redis.call('HGET', rec, 'status')] then
    -- Only jobs still going are indexed: a finished job's pair would never be removed.
    index[#index + 1] = ARGV[a]
    index[#index + 1] = ARGV[a + 1]
    redis.call('HSET', rec, 'status', 'running', 'started_ms', ARGV[1], 'model', ARGV[2],
      'version', ARGV[a + 2], 'attempts', ARGV[a + 3])
    if ARGV[a + 4] ~= '' then
      redis.call('HSET', rec, 'reply_to', ARGV[a + 4])
    end
    marked = marked + 1
  end
end
if #index > 0 then
  redis.call('HSET', KEYS[1], unpack(index))
end
return marked
