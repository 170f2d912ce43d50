-- POST /refresh, each family rotated by one request at a time. Run with one
-- connection per thread (-t N -c N): wrk may call request() twice for one send
-- (when the first write would block), so the token in flight is only taken off
-- the queue when its answer arrives, and a repeated call repeats the same token.
-- args = refresh tokens file (one per family), thread count.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function init(args)
  queue = read_share(args[1], tonumber(args[2]))
  head, tail, bad = 1, #queue, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local token = queue[head] or "no-family-left"
  return wrk.format(nil, nil, nil, '{"refresh_token":"' .. token .. '"}')
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
