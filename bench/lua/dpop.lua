-- GET with one DPoP-bound access token and a fresh DPoP proof per request, taken in
-- order from this thread's share of a pre-made list (RFC 9449: each proof once).
-- args = proofs file, thread count, access token.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function init(args)
  proofs = read_share(args[1], tonumber(args[2]))
  authorization = "DPoP " .. args[3]
  pos = 0
end

function request()
  pos = pos + 1
  if pos > #proofs then pos = 1 end -- out of proofs: replays, which the server refuses
  return wrk.format(nil, nil, { Authorization = authorization, DPoP = proofs[pos] })
end
