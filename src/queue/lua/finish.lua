#!lua
-- Write terminal results for a batch, first writer wins, and acknowledge. A job whose
-- record is already terminal (a second delivery, a cancel) is only acknowledged: no
-- second reply push, no overwrite. Re-running this script is harmless, so a batch
-- whose round trip failed is simply sent again.
--
-- KEYS[1]  inferq:{m}:jobs      the stream
-- KEYS[2]  inferq:{m}:dlq       dead letters
-- KEYS[3]  inferq:{m}:inflight  entry id -> job id index
-- then per job: KEYS[r] its record, KEYS[r+1] its reply list (or the record again)
-- ARGV[1] group   ARGV[2] result TTL (s)   ARGV[3] done channel
-- ARGV[4] dead-letter retention MINID (an entry id; older dead letters are trimmed)
-- then per job: entry id, job id, has_reply (0/1), record JSON for the reply,
--   n (hash field count), n field/value pairs, d (dead-letter field count), d pairs
-- Returns one flag per job: 1 when this call turned it terminal, 0 when it already was.
local stream, dlq, inflight = KEYS[1], KEYS[2], KEYS[3]
local group, ttl, channel, dlq_min = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local terminal = {succeeded = true, failed = true, expired = true, cancelled = true}
local written = {}
local a, k = 5, 4
while a <= #ARGV do
  local eid, id, has_reply, json = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local rec, reply = KEYS[k], KEYS[k + 1]
  local n = tonumber(ARGV[a + 4])
  local fields_at = a + 5
  local d = tonumber(ARGV[fields_at + 2 * n])
  local dlq_at = fields_at + 2 * n + 1
  if not terminal[redis.call('HGET', rec, 'status')] then
    local fields = {}
    for i = 0, 2 * n - 1 do
      fields[#fields + 1] = ARGV[fields_at + i]
    end
    redis.call('HSET', rec, unpack(fields))
    redis.call('HDEL', rec, 'last_error')
    redis.call('EXPIRE', rec, ttl)
    if has_reply == '1' then
      redis.call('RPUSH', reply, json)
      redis.call('EXPIRE', reply, ttl)
    end
    if d > 0 then
      local dead = {}
      for i = 0, 2 * d - 1 do
        dead[#dead + 1] = ARGV[dlq_at + i]
      end
      redis.call('XADD', dlq, 'MINID', '~', dlq_min, '*', unpack(dead))
    end
    redis.call('PUBLISH', channel, id)
    written[#written + 1] = 1
  else
    written[#written + 1] = 0
  end
  redis.call('HDEL', inflight, eid)
  redis.call('XACK', stream, group, eid)
  a = dlq_at + 2 * d
  k = k + 2
end
return written
