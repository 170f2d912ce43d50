"""Plain helpers shared by the tests; the fixtures built on them live in `tests/conftest.py`.

- `databases`: the PostgreSQL test databases and the markers that pick a backend.
- `factories`: real rows in a real store (`make_user`, `seed_user`).
- `app`: the app started in-process (`Running`, `StartApp`), its clock, /refresh calls.
- `tokens`: decoding JWTs and JWKS, and the checks every token response must pass.
- `cli`: the `authserver` command run in-process with typer's CliRunner.
- `procs`: real `authserver serve` processes on free ports.

No test module imports another, and nothing imports `conftest.py`.
"""
