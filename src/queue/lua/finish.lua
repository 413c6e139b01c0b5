#!lua
-- Write terminal results for a batch, first writer wins, and acknowledge. The terminal
-- record is one string set with NX: a job already terminal (a second delivery, a
-- cancel) keeps its record and gets no second reply push. Re-running this script is
-- harmless, so a batch whose round trip failed is simply sent again.
--
-- KEYS[1]  inferq:{m}:jobs      the stream
-- KEYS[2]  inferq:{m}:dlq       dead letters
-- KEYS[3]  inferq:{m}:inflight  entry id -> job id index
-- then per job 3 keys: its result, its record hash, its reply list (each repeated as
--   the result key when the job has none)
-- ARGV[1] group   ARGV[2] result TTL (s)   ARGV[3] done channel
-- ARGV[4] dead-letter retention MINID (older dead letters are trimmed)
-- then per job: entry id, job id ('' when the entry had none: only dead-lettered and
--   acked), record JSON, d (dead-letter field count), d field/value pairs
-- Returns one flag per job: 1 when this call turned it terminal, 0 when it already was.
local stream, dlq, inflight = KEYS[1], KEYS[2], KEYS[3]
local group, ttl, channel, dlq_min = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local written, entries, won, replies = {}, {}, {}, {}
local a, k = 5, 4
while a <= #ARGV do
  local eid, id, json, d = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local result, hash, reply = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  entries[#entries + 1] = eid
  local fresh = 1
  if id ~= '' then
    -- The hash gets the TTL even when the result already existed (a later delivery's
    -- running mark may have made one the first writer did not know of), but only if
    -- it has none: a hash never outlives its result by a duplicate's late write.
    if hash ~= result then redis.call('EXPIRE', hash, ttl, 'NX') end
    if redis.call('SET', result, json, 'NX', 'EX', ttl) then
      won[#won + 1] = id
      if reply ~= result then
        redis.call('RPUSH', reply, json)
        replies[reply] = true
      end
    else
      fresh = 0
    end
  end
  if fresh == 1 and d > 0 then
    redis.call('XADD', dlq, 'MINID', '~', dlq_min, '*', unpack(ARGV, a + 4, a + 3 + 2 * d))
  end
  written[#written + 1] = fresh
  a = a + 4 + 2 * d
  k = k + 3
end
for reply in pairs(replies) do
  redis.call('EXPIRE', reply, ttl)
end
if #won > 0 then
  redis.call('PUBLISH', channel, table.concat(won, ' '))
end
-- In chunks: Lua's unpack fails beyond about 8,000 values.
for i = 1, #entries, 1000 do
  local j = math.min(i + 999, #entries)
  redis.call('HDEL', inflight, unpack(entries, i, j))
  redis.call('XACK', stream, group, unpack(entries, i, j))
end
return written
