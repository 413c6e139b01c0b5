#!lua
-- Mark a batch's jobs running, skipping those already terminal. Sent for a batch
-- still going after a few milliseconds; the worker does not wait for it.
--
-- KEYS  per job: inferq:{m}:job:<id> (the record hash), inferq:{m}:result:<id>
-- ARGV[1] started_ms   ARGV[2] model
-- then per job, 3 values: version, attempts, reply_to or ''
-- Returns the number of records marked.
local marked = 0
for i = 1, #KEYS, 2 do
  local a = 3 + (i - 1) / 2 * 3
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('HSET', KEYS[i], 'status', 'running', 'started_ms', ARGV[1], 'model', ARGV[2],
      'version', ARGV[a], 'attempts', ARGV[a + 1])
    if ARGV[a + 2] ~= '' then
      redis.call('HSET', KEYS[i], 'reply_to', ARGV[a + 2])
    end
    marked = marked + 1
  end
end
return marked
