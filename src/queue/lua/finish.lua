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
-- ARGV[4] dead-letter retention MINID (older dead letters are trimmed)   ARGV[5] model
-- then per job, 10 values and the dead-letter pairs:
--   entry id, job id ('' when the entry had none: only dead-lettered and acked),
--   status, outputs JSON or error message, error_kind ('' on success), version,
--   attempts, started_ms, finished_ms, reply record JSON ('' when no reply_to),
--   d (dead-letter field count), d field/value pairs
-- Returns one flag per job: 1 when this call turned it terminal, 0 when it already was.
local stream, dlq, inflight = KEYS[1], KEYS[2], KEYS[3]
local group, ttl, channel, dlq_min, model = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local terminal = {succeeded = true, failed = true, expired = true, cancelled = true}
local written, entries = {}, {}
local a, k = 6, 4
while a <= #ARGV do
  local eid, id, status, body, kind = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local version, attempts, started, finished, json = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
  local d = tonumber(ARGV[a + 10])
  local rec, reply = KEYS[k], KEYS[k + 1]
  entries[#entries + 1] = eid
  if id ~= '' and terminal[redis.call('HGET', rec, 'status')] then
    written[#written + 1] = 0
  else
    if id ~= '' then
      local f = {'status', status, 'model', model, 'enqueued_ms', string.match(eid, '^(%d+)'),
        'finished_ms', finished, 'attempts', attempts}
      if version ~= '' then f[#f + 1] = 'version'; f[#f + 1] = version end
      if started ~= '' then f[#f + 1] = 'started_ms'; f[#f + 1] = started end
      if status == 'succeeded' then
        f[#f + 1] = 'outputs'; f[#f + 1] = body
      else
        f[#f + 1] = 'error'; f[#f + 1] = body
        f[#f + 1] = 'error_kind'; f[#f + 1] = kind
      end
      if d > 0 then f[#f + 1] = 'dead_lettered'; f[#f + 1] = '1' end
      redis.call('HSET', rec, unpack(f))
      redis.call('EXPIRE', rec, ttl)
      if json ~= '' then
        redis.call('RPUSH', reply, json)
        redis.call('EXPIRE', reply, ttl)
      end
      redis.call('PUBLISH', channel, id)
    end
    if d > 0 then
      redis.call('XADD', dlq, 'MINID', '~', dlq_min, '*', unpack(ARGV, a + 11, a + 10 + 2 * d))
    end
    written[#written + 1] = 1
  end
  a = a + 11 + 2 * d
  k = k + 2
end
if #entries > 0 then
  redis.call('HDEL', inflight, unpack(entries))
  redis.call('XACK', stream, group, unpack(entries))
end
return written
