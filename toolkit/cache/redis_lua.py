"""The Redis side of the shared cache store (store_redis.py): key layout and the Lua scripts that write it.

Each script runs atomically in Redis, so concurrent writers on any number of replicas cannot interleave inside an
insert: replacement, expiry purge, the namespace quota and max_entries are decided on one consistent state.

Keys (all under one hash tag `{prefix:fingerprint}`; the fingerprint hashes cache.json's embedder and centroids
plus ttl_s / max_entries / max_entries_per_namespace, so replicas share entries only when they embed, expire and
evict the same way; another config gets its own key space):
  e:<id>        hash: q (normalized query), a (answer as strict JSON), v (float32 little-endian vector bytes),
                c (cluster), t (Redis server time of the insert), n (the canonical namespace key), h, x
  x:<h>:<qh>    the exact-match key -> id (a newer answer for the same query replaces the old entry)
  ns:<h>:ids    sorted set of the namespace's ids (insertion order; without quota_by the quota evicts its front)
  g:<gh>:ids    with quota_by: sorted set of the ids of every namespace sharing that quota key (the quota evicts
                its front); the entry's field g names the set that counts it
  ns:<h>:log    stream of add/del events; ns:<h>:ver = seq of its last event; each event names its predecessor
  seq, all      global id counter; sorted set of every id (max_entries evicts its front)
Entries and their exact keys expire through Redis (PEXPIREAT, from the server's clock); a namespace's bookkeeping
lives as long as its youngest entry. Nothing is pickled: vectors are raw float32, answers JSON.
"""

_PURGE = """
local function purge(zkey)  -- entries expire oldest first: drop the dead ones from the front
  while true do
    local first = redis.call('ZRANGE', zkey, 0, 0)[1]
    if not first or redis.call('EXISTS', base .. ':e:' .. first) == 1 then return end
    redis.call('ZREM', zkey, first)
  end
end
"""

COUNT_LUA = "local base = ARGV[1]\n" + _PURGE + "purge(KEYS[1])\nreturn redis.call('ZCARD', KEYS[1])\n"

# KEYS: seq, all. ARGV: base, h, namespace key, ttl_ms (0 = none), quota (0 = none), max_entries, log maxlen,
# the quota's sorted set (the namespace's ids, or g:<gh>:ids), then per entry: normalized query, exact key suffix,
# answer JSON, vector bytes, cluster.
INSERT_LUA = "local base = ARGV[1]\n" + _PURGE + """
local seqk, all, h, nsk = KEYS[1], KEYS[2], ARGV[2], ARGV[3]
local ttl, quota, maxn, maxlen, gk = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local created = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local function nskeys(hh)
  local p = base .. ':ns:' .. hh
  return p .. ':ver', p .. ':ids', p .. ':log'
end
local function emit(hh, op, id, seq)
  local ver, _, lg = nskeys(hh)
  local prev = redis.call('GET', ver) or '0'
  redis.call('XADD', lg, 'MAXLEN', '~', maxlen, '*', 'op', op, 'id', id, 'seq', seq, 'prev', prev)
  redis.call('SET', ver, seq, 'KEEPTTL')
end
local function kill(id, zkey)  -- remove one entry everywhere and tell its namespace's replicas
  local e = base .. ':e:' .. id
  local f = redis.call('HMGET', e, 'h', 'x', 'g')
  redis.call('ZREM', all, id)
  if not f[1] then redis.call('ZREM', zkey, id) return end  -- expired already
  redis.call('DEL', e)
  local ver, ids, lg = nskeys(f[1])
  redis.call('ZREM', ids, id)
  if f[3] and f[3] ~= ids then redis.call('ZREM', f[3], id) end
  if redis.call('GET', f[2]) == tostring(id) then redis.call('DEL', f[2]) end
  if f[1] ~= h and redis.call('ZCARD', ids) == 0 then
    redis.call('DEL', ver, ids, lg)  -- an emptied namespace: replicas see no ver and drop their mirror
  else
    emit(f[1], 'del', id, redis.call('INCR', seqk))
  end
end
local ver, ids, lg = nskeys(h)
local n = (#ARGV - 8) / 5
for i = 0, n - 1 do
  local j = 9 + 5 * i
  local x = base .. ':x:' .. h .. ':' .. ARGV[j + 1]
  local old = redis.call('GET', x)
  if old then kill(old, ids) end
  purge(ids)
  purge(all)
  if quota > 0 then
    if gk ~= ids then purge(gk) end
    while redis.call('ZCARD', gk) >= quota do kill(redis.call('ZRANGE', gk, 0, 0)[1], gk) end
  end
  while redis.call('ZCARD', all) >= maxn do kill(redis.call('ZRANGE', all, 0, 0)[1], all) end
  local id = redis.call('INCR', seqk)
  local e = base .. ':e:' .. id
  redis.call('HSET', e, 'q', ARGV[j], 'a', ARGV[j + 2], 'v', ARGV[j + 3], 'c', ARGV[j + 4], 't', created,
             'n', nsk, 'h', h, 'x', x, 'g', gk)
  redis.call('SET', x, id)
  if ttl > 0 then
    redis.call('PEXPIREAT', e, now_ms + ttl)
    redis.call('PEXPIREAT', x, now_ms + ttl)
  end
  redis.call('ZADD', ids, id, id)
  if gk ~= ids then redis.call('ZADD', gk, id, id) end
  redis.call('ZADD', all, id, id)
  emit(h, 'add', id, id)
  if ttl > 0 then
    for _, k in ipairs({ver, ids, lg, gk}) do redis.call('PEXPIRE', k, ttl + 60000) end
  end
end
return n
"""
