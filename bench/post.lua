-- wrk: POST the same small chat request as loadgen.py (payloads.REQUEST_BODY / REQUEST_HEADERS).
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-client"
wrk.headers["User-Agent"] = "llmproxy-bench"
