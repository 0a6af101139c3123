-- wrk script: POST /v1/chat/completions to a syft-router HTTP front, each request with its own
-- Idempotency-Key (a paid request id can be charged only once). Environment:
--   SYFT_USERS   comma-separated "email:token" pairs (token empty for a free service); requests
--                cycle over them, so one pair is the one-payer shape and 64 pairs the 64-payer one
--   SYFT_MODEL   model name (default "bench")
local users = {}
for pair in string.gmatch(os.getenv("SYFT_USERS") or "", "[^,]+") do
    local email, token = string.match(pair, "^([^:]*):?(.*)$")
    users[#users + 1] = { email = email, token = token }
end
local model = os.getenv("SYFT_MODEL") or "bench"
local counter = 0
-- Global, not local: `thread:set` in `setup` writes each thread's globals, and a local here would
-- shadow it (both threads then sent the same keys and half the requests got 409).
prefix = ""

function setup(thread)
    counter = counter + 1
    thread:set("prefix", string.format("wrk-%d-%d-", os.time(), counter))
end

local n = 0
function request()
    n = n + 1
    local u = users[(n % #users) + 1]
    local headers = {
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = prefix .. n,
    }
    if u.token ~= "" then
        headers["Authorization"] = "Bearer " .. u.token
    end
    local body = string.format(
        '{"model":"%s","user":"%s","max_tokens":32,"messages":[{"role":"user","content":"hello there"}]}',
        model, u.email)
    return wrk.format("POST", "/v1/chat/completions", headers, body)
end

local non2xx = 0
function response(status, headers, body)
    if status ~= 200 then
        non2xx = non2xx + 1
    end
end
