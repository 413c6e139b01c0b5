#!lua
-- Take up to COUNT new entries for this consumer and mark their jobs running, in one
-- step: a job is never delivered without its running mark, and the worker sends no
-- per-job arguments. Job ids are checked before they become keys; every key built
-- here starts with the model's own prefix, so it stays in this model's slot.
--
-- KEYS[1]  inferq:{m}:jobs       the stream
-- KEYS[2]  inferq:{m}:inflight   hash entry id -> job id
-- ARGV[1] group   ARGV[2] consumer   ARGV[3] count   ARGV[4] started_ms
-- ARGV[5] record key prefix (inferq:{m}:job:)   ARGV[6] model
-- Returns {1, entries} (XREADGROUP's [id, fields] list), or {0, last id} when no
-- entry waits (the caller then blocks with XREAD on that id).
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not r then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if last[1] then
    return {0, last[1][1]}
  end
  return {0, '0-0'}
end
local entries = r[1][2]
local terminal = {succeeded = true, failed = true, expired = true, cancelled = true}
local index = {}
for _, e in ipairs(entries) do
  local fields = e[2]
  local id = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then
      id = fields[i + 1]
      break
    end
  end
  if id and #id <= 128 and string.match(id, '^[%w%.:_%-]+$') then
    local rec = ARGV[5] .. id
    if not terminal[redis.call('HGET', rec, 'status')] then
      redis.call('HSET', rec, 'status', 'running', 'started_ms', ARGV[4], 'attempts', 1, 'model', ARGV[6])
    end
    index[#index + 1] = e[1]
    index[#index + 1] = id
  end
end
if #index > 0 then
  redis.call('HSET', KEYS[2], unpack(index))
end
return {1, entries}
