"""The baselines authserver is measured against: separate apps in their own processes.

- `bare`: a bare FastAPI app answering `GET /protected` with the JSON body authserver
  returns there, with no authentication: the ceiling for any FastAPI endpoint on this
  machine, served the way authserver is (one uvicorn worker, uvloop, httptools, no
  access log).
- `sign`: a minimal FastAPI app answering `POST /refresh` by reading the body and
  signing one RFC 9068 access token with the same key file and the same library
  (python-jose) as authserver: the ceiling for an endpoint that must sign a token.

Neither imports authserver: a peer that shared authserver's middleware, error
handling or helpers would pay authserver's overheads and flatter every ratio.
They are configured by environment variables (see `settings.py`), because uvicorn
builds them from a factory that takes no arguments.
"""
