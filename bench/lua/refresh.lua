-- POST /refresh, each family rotated by one request at a time. Run with one
-- connection per thread (-t N -c N): wrk may call request() twice for one send
-- (when the first write would block), so the token in flight is only taken off
-- the queue when its answer arrives, and a repeated call repeats the same token.
-- args = refresh tokens file (one per family), thread count, start offset, and
-- optionally a DPoP proofs file: then each request carries the next proof.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function init(args)
  queue = read_share(args[1], tonumber(args[2]))
  head, tail, bad = 1, #queue, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[4] then
    proofs, pos = read_share(args[4], tonumber(args[2])), 0
  end
end

function request()
  local token = queue[head] or "no-family-left"
  local body = '{"refresh_token":"' .. token .. '"}'
  if proofs then
    pos = pos + 1
    if pos > #proofs then pos = 1 end
    local headers = { ["Content-Type"] = "application/json", DPoP = proofs[pos] }
    return wrk.format(nil, nil, headers, body)
  end
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  local successor = status == 200 and body:match('"refresh_token":"([^"]+)"')
  if head <= tail then
    queue[head] = nil
    head = head + 1
  end
  if successor then
    tail = tail + 1
    queue[tail] = successor
  else
    bad = bad + 1
  end
end
