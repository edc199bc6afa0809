"""The local Hub of the tests (tests/hub_server.py) behaves like the Hub for the real client."""

from __future__ import annotations

import httpx2
import hub_server
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def test_commits_branches_tags_and_listings(hub):
    api = HfApi(endpoint=hub.url)
    repo = hub.repo_id("server")
    assert api.create_repo(repo, private=True) == f"{hub.url}/{repo}"
    assert api.create_repo(repo, private=True, exist_ok=True) == f"{hub.url}/{repo}"
    first = api.create_commit(repo, [CommitOperationAdd("a/x.txt", b"one"),
                                     CommitOperationAdd("a/w.safetensors", b"\0" * 100)],
                              commit_message="first").oid
    api.create_tag(repo, tag="v1")
    api.create_branch(repo, branch="dev")
    api.delete_file("a/x.txt", repo, commit_message="second")
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "a/w.safetensors"]
    assert sorted(api.list_repo_files(repo, revision="v1")) == [
        ".gitattributes", "a/w.safetensors", "a/x.txt"]
    assert api.list_repo_files(repo, revision=first) == api.list_repo_files(repo, revision="dev")
    refs = api.list_repo_refs(repo)
    assert {b.name: b.target_commit for b in refs.branches}["dev"] == first
    assert [t.name for t in refs.tags] == ["v1"]
    assert [c.title for c in api.list_repo_commits(repo)] == ["second", "first", "initial commit"]
    lfs = next(f for f in api.list_repo_tree(repo, "a") if f.path == "a/w.safetensors")
    assert lfs.lfs is not None and lfs.lfs.size == 100  # *.safetensors is stored with LFS
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="nope")


def test_listings_are_paginated(hub):
    api = HfApi(endpoint=hub.url)
    repo = hub.repo_id("pages")
    api.create_repo(repo)
    files = [CommitOperationAdd(f"f{i:03d}.txt", str(i).encode())
             for i in range(hub_server.PAGE_SIZE + 5)]
    api.create_commit(repo, files, commit_message="many")
    before = len(hub.server.requests("tree"))
    assert len(list(api.list_repo_tree(repo))) == hub_server.PAGE_SIZE + 6  # + .gitattributes
    assert len(hub.server.requests("tree")) - before == 2


def test_downloads_at_a_revision_with_resume(hub, tmp_path):
    api = HfApi(endpoint=hub.url)
    repo = hub.repo_id("download")
    api.create_repo(repo)
    old = api.create_commit(repo, [CommitOperationAdd("w.bin", b"old" * 1000)],
                            commit_message="old").oid
    api.create_commit(repo, [CommitOperationAdd("w.bin", b"new" * 1000)], commit_message="new")
    path = hf_hub_download(repo, "w.bin", revision=old, endpoint=hub.url, cache_dir=tmp_path)
    assert open(path, "rb").read() == b"old" * 1000
    folder = snapshot_download(repo, endpoint=hub.url, cache_dir=tmp_path / "2")
    assert open(f"{folder}/w.bin", "rb").read() == b"new" * 1000
    ranged = httpx2.get(f"{hub.url}/{repo}/resolve/main/w.bin", headers={"Range": "bytes=2997-"})
    assert ranged.status_code == 206 and ranged.content == b"new"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo, "missing.bin", endpoint=hub.url, cache_dir=tmp_path)


def test_tokens_are_checked(hub, monkeypatch):
    api = HfApi(endpoint=hub.url)
    repo = hub.repo_id("auth")
    api.create_repo(repo, private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError) as missing:
        api.repo_info(repo)  # private and no token: 401, which the client reads as not found
    assert missing.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as no_token:
        api.create_repo(hub.repo_id("other"))
    assert no_token.value.response.status_code == 401
    monkeypatch.setenv("HF_TOKEN", hub.server.add_token("bob"))
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(repo)  # someone else's private repo: 404
    with pytest.raises(HfHubHTTPError) as forbidden:
        api.create_repo(f"{hub.user}/bobs-try")
    assert forbidden.value.response.status_code == 403


def test_faults_fire_a_bounded_number_of_times(hub):
    api = HfApi(endpoint=hub.url)
    repo = hub.repo_id("faults")
    api.create_repo(repo)
    hub.server.fail("info", "status", status=500, times=2)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as error:
            api.repo_info(repo)
        assert error.value.response.status_code == 500
    assert api.repo_info(repo).id == repo
    with pytest.raises(ValueError, match="unknown route"):
        hub.server.fail("no-such-route")
