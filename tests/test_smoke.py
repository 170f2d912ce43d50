from __future__ import annotations

from tests.conftest import Running


async def test_login_protected_refresh(server: Running) -> None:
    tokens = await server.login()
    r = await server.client.get(
        "/protected", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert r.status_code == 200
    assert r.json() == {"message": "Access granted for protected route.", "username": "alice"}
    r = await server.client.post("/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200
    assert r.json()["refresh_token"] != tokens["refresh_token"]
