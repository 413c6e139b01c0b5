#!lua
-- Take up to COUNT new entries for this consumer and, in the same step, index each
-- entry id to its job id (and reply list): a job whose entry vanishes while pending
-- can then still be answered by name, even if its worker died the moment it read it.
--
-- KEYS[1]  inferq:{m}:jobs       the stream
-- KEYS[2]  inferq:{m}:inflight   hash entry id -> "job id" or "job id reply_to"
-- ARGV[1] group   ARGV[2] consumer   ARGV[3] count
-- Returns {1, entries} (XREADGROUP's [id, fields] list), or {0, last id} when no
-- entry waits (the caller then blocks with XREAD after that id).
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not r then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if last[1] then
    return {0, last[1][1]}
  end
  return {0, '0-0'}
end
local entries = r[1][2]
local index = {}
for _, e in ipairs(entries) do
  local fields, id, reply = e[2], nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then
      id = fields[i + 1]
    elseif fields[i] == 'reply_to' then
      reply = fields[i + 1]
    end
  end
  if id and not string.find(id, ' ', 1, true) then
    index[#index + 1] = e[1]
    index[#index + 1] = reply and (id .. ' ' .. reply) or id
  end
end
if #index > 0 then
  redis.call('HSET', KEYS[2], unpack(index))
end
return {1, entries}
