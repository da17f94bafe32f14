"""Who is calling is one thing, whatever the credentials: a key, a user logged in here, or a person
the identity provider vouches for, each a Principal with its scopes, its limit and its owner id."""

from __future__ import annotations

from pipelines.auth.principal import Principal
from pipelines.core.models import ApiKey, User


def test_a_key_a_user_and_a_person_are_each_a_principal_of_their_kind():
    key = Principal.of_key(ApiKey(id="key_1", name="etl", prefix="", key_hash="", scopes=["write"],
                                  rate_limit_per_minute=None, tier="premium"))
    user = Principal.of_user(User(id="usr_1", username="ana", password_hash="", scopes=["read"]))
    person = Principal.of_person("abc", "Ana", ["admin"])
    assert (key.kind, key.id, key.tier) == ("key", "key_1", "premium")
    assert (user.kind, user.id, user.name) == ("user", "usr_1", "ana")
    assert (person.kind, person.id) == ("user", "oidc:abc")


def test_scopes_include_the_ones_below_and_admins_see_everyones_objects():
    writer = Principal("key_w", "key", "w", ("write",))
    admin = Principal("usr_a", "user", "a", ("admin",))
    reader = Principal("key_r", "key", "r", ("read",))
    assert writer.grants("read") and writer.grants("write") and not writer.grants("admin")
    assert admin.grants("write") and not reader.grants("write")
    assert writer.owner == "key_w" and reader.owner == "key_r" and admin.owner is None
    assert not Principal("key_x", "key", "x", ("bogus",)).grants("read")
