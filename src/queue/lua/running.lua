#!lua
-- Mark a batch's jobs running, skipping those already terminal. Sent for a batch
-- still going after a few milliseconds; the worker does not wait for it.
--
-- KEYS[1..n]  inferq:{m}:job:<id>   one record per job
-- ARGV[1] started_ms   ARGV[2] model
-- then per job, 5 values: entry id, job id, version, attempts, reply_to or ''
-- Returns the number of records marked.
local marked = 0
local terminal = {succeeded = true, failed = true, expired = true, cancelled = true}
for i = 1, #KEYS do
  local a = 3 + (i - 1) * 5
  local rec = KEYS[i]
  if not terminal[redis.call('HGET', rec, 'status')] then
    redis.call('HSET', rec, 'status', 'running', 'started_ms', ARGV[1], 'model', ARGV[2],
      'version', ARGV[a + 2], 'attempts', ARGV[a + 3])
    if ARGV[a + 4] ~= '' then
      redis.call('HSET', rec, 'reply_to', ARGV[a + 4])
    end
    marked = marked + 1
  end
end
return marked
