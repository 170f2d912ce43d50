-- GET with a fresh access token per request, cycling through this thread's share
-- of a pre-minted list. args = tokens file, thread count, start offset.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function init(args)
  local share = read_share(args[1], tonumber(args[2]))
  requests = {}
  for i, token in ipairs(share) do
    requests[i] = wrk.format(nil, nil, { Authorization = "Bearer " .. token })
  end
  -- Continue where the previous round stopped, so no token comes round again
  -- while the server could still remember it.
  pos = tonumber(args[3]) % #requests
end

function request()
  pos = pos + 1
  if pos > #requests then pos = 1 end
  return requests[pos]
end
