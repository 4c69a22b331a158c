"""Users, roles and quotas (``gradhub.server.auth``): the tokens file's checks, who a token is,
what each role may do to whose job, and when a job is over its owner's quota."""

from __future__ import annotations

import hashlib

import pytest

from gradhub.proto.contract.errors import AuthError, PermissionDeniedError
from gradhub.server.auth import ADMIN, Action, Principal, Quota, Role, Users

ALICE_TOKEN = "alice-" + "a" * 20
OPS_TOKEN = "ops-" + "o" * 20


def _file(tmp_path, text: str):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def users(tmp_path) -> Users:
    digest = hashlib.sha256(OPS_TOKEN.encode()).hexdigest()
    return Users.from_file(_file(tmp_path, f"""
users:
  - {{name: alice, token: "{ALICE_TOKEN}", role: user, quota: {{cpus: 2, gpus: 1}}}}
  - {{name: ops, token_sha256: "{digest}", role: admin}}
  - {{name: carol, token: "carol-{'c' * 20}", role: viewer}}
"""))


def test_a_token_is_its_user_and_a_hashed_token_works_as_well(users):
    alice = users.authenticate(f"Bearer {ALICE_TOKEN}")
    assert (alice.name, alice.role, alice.quota) == ("alice", Role.USER, Quota(cpus=2, gpus=1))
    assert users.authenticate(f"Bearer {OPS_TOKEN}").role is Role.ADMIN
    assert users.names == {"alice", "ops", "carol"}
    for wrong in ("", "Bearer", f"Basic {ALICE_TOKEN}", f"Bearer {ALICE_TOKEN}x", "Bearer " + "a" * 30):
        with pytest.raises(AuthError, match="bearer token"):
            users.authenticate(wrong)


def test_single_token_and_open_modes():
    single = Users.single("s" * 20)
    assert single.authenticate("Bearer " + "s" * 20) is ADMIN
    with pytest.raises(AuthError):
        single.authenticate("Bearer nope")
    assert Users.open().authenticate("") is ADMIN  # loopback without a token: everyone is admin


@pytest.mark.parametrize(("text", "message"), [
    ("users: []", "must hold `users:`"),
    ("nonsense: 1", "must hold `users:`"),
    ("users: [1]", r"users\[0\]: must be a mapping"),
    ("users: [{name: a, token: short, role: user}]", r"users\[0\].token: must be a string of at least 16"),
    ("users: [{name: a, role: user}]", "exactly one of token and token_sha256"),
    (f"users: [{{name: a, token: {'t' * 20}, token_sha256: {'0' * 64}, role: user}}]", "exactly one"),
    ("users: [{name: a, token_sha256: xyz, role: user}]", "token_sha256: must be 64 hex digits"),
    (f"users: [{{name: a, token: {'t' * 20}, role: root}}]", r"users\[0\].role: must be one of admin, user, viewer"),
    (f"users: [{{name: 'a b', token: {'t' * 20}, role: user}}]", r"users\[0\].name"),
    (f"users: [{{name: a, token: {'t' * 20}, role: user, extra: 1}}]", "unknown field.*extra"),
    (f"users: [{{name: a, token: {'t' * 20}, role: user, quota: {{cpus: -1}}}}]", r"quota.cpus: must be a number"),
    (f"users: [{{name: a, token: {'t' * 20}, role: user, quota: {{tpus: 1}}}}]", "quota: must be a mapping of cpus"),
    (f"users: [{{name: a, token: {'t' * 20}, role: user}}, {{name: a, token: {'u' * 20}, role: user}}]",
     r"users\[1\].name: 'a' appears twice"),
    (f"users: [{{name: a, token: {'t' * 20}, role: user}}, {{name: b, token: {'t' * 20}, role: user}}]",
     "the same token as 'a'"),
    ("users: [unclosed", "cannot read"),
])
def test_a_wrong_tokens_file_is_refused_naming_the_entry_and_field(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        Users.from_file(_file(tmp_path, text))


def test_a_missing_tokens_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        Users.from_file(tmp_path / "absent.yaml")


ALICE, BOB = Principal("alice", Role.USER), Principal("bob", Role.USER)
CAROL = Principal("carol", Role.VIEWER)


@pytest.mark.parametrize("action", list(Action))
def test_admins_may_do_anything_to_any_job(action):
    Principal("ops", Role.ADMIN).check(action, "alice")
    ADMIN.check(action, "")


@pytest.mark.parametrize("action", [Action.CANCEL, Action.SCALE, Action.DELETE, Action.PULL])
def test_users_act_on_their_own_jobs_only(action):
    ALICE.check(action, "alice")
    with pytest.raises(PermissionDeniedError, match=f"alice \\(user\\) may {action} only their own jobs; this one "
                                                   "belongs to bob"):
        ALICE.check(action, "bob")
    with pytest.raises(PermissionDeniedError, match="belongs to no user"):
        ALICE.check(action, "")  # submitted before the server had users: an admin's


def test_everyone_reads_every_job_and_viewers_only_read():
    for who in (ALICE, BOB, CAROL):
        who.check(Action.READ, "alice")
    ALICE.check(Action.SUBMIT)
    for action in (Action.SUBMIT, Action.CANCEL, Action.SCALE, Action.PULL, Action.DELETE):
        with pytest.raises(PermissionDeniedError, match=f"carol \\(viewer\\) is a viewer and may only read jobs, "
                                                       f"not {action}"):
            CAROL.check(action, "carol")


def test_quota_over_and_never():
    quota = Quota(cpus=2, gpus=1)
    assert quota.over({}, {"CPU": 2.0}) is None
    assert quota.over({"CPU": 1.5}, {"CPU": 0.5}) is None
    assert quota.over({"CPU": 1.5}, {"CPU": 1.0}) == "CPUs 1.5 of 2 in use by running jobs, this job needs 1"
    assert quota.over({"GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}).startswith("GPUs 1 of 1 in use")
    assert quota.over({"GPU": 5.0}, {"CPU": 1.0}) is None  # a CPU job is not held by GPUs in use
    assert quota.never({"CPU": 2.0, "GPU": 1.0}) is None
    assert quota.never({"CPU": 3.0}) == "the job needs 3 CPUs, over the quota of 2"
    assert Quota().over({"CPU": 1e6}, {"CPU": 1e6}) is None and Quota().never({"GPU": 64}) is None
    users = Users.single("s" * 20)
    assert users.quota("anyone") == Quota()
