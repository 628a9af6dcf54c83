"""`uptrain export-gguf` without a llama.cpp tree: one message naming the fix, exit 2, nothing written (the
conversions themselves are in test_llama_cpp.py, slow tier)."""
from uptrain.cli import main


def test_export_gguf_without_llama_cpp_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UPTRAIN_LLAMA_CPP", str(tmp_path / "none"))
    assert main(["export-gguf", str(tmp_path), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "no llama.cpp converter in" in err and ".ci/build_llama_cpp.sh" in err and "--llama-cpp" in err
    assert not (tmp_path / "m.gguf").exists()
