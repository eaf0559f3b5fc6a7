"""Model loading on a public deployment: local folders only under allowed roots, never remote code."""

import pytest

from kvcore.models.loader import BUNDLED_DIR, load_model, local_folder, public_deployment


@pytest.fixture
def public(monkeypatch):
    monkeypatch.setenv("KVLAB_PUBLIC", "1")
    monkeypatch.delenv("KVLAB_MODEL_DIRS", raising=False)


def test_local_folders_load_when_private(monkeypatch):
    monkeypatch.delenv("KVLAB_PUBLIC", raising=False)
    assert not public_deployment()
    assert local_folder(str(BUNDLED_DIR)) == BUNDLED_DIR
    assert local_folder("gpt2") is None  # not a folder here: a Hub name


@pytest.mark.usefixtures("public")
@pytest.mark.parametrize("name", ["/etc", "../../etc", "~", "./kvcore", str(BUNDLED_DIR)])
def test_public_deployment_refuses_paths(name):
    with pytest.raises(ValueError, match="local model folders are turned off"):
        local_folder(name)
    with pytest.raises(ValueError, match="turned off"):
        load_model(name)


@pytest.mark.usefixtures("public")
def test_public_deployment_allows_folders_under_allowed_roots(monkeypatch):
    monkeypatch.setenv("KVLAB_MODEL_DIRS", str(BUNDLED_DIR.parent))
    assert local_folder(str(BUNDLED_DIR)) == BUNDLED_DIR
    with pytest.raises(ValueError, match="turned off"):
        local_folder("/etc")


@pytest.mark.usefixtures("public")
def test_bundled_model_still_loads_in_public():
    model, tokenizer = load_model(None)
    assert model.config.model_type == "llama"
    assert tokenizer.bos_token_id is not None
