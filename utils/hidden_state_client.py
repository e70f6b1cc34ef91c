"""Client of the hidden-state server (``python -m servers.hidden_state_server``).

    client = HiddenStateClient("http://127.0.0.1:8000")
    client.info()                                   # {"model": ..., "layer": ..., "dim": ..., ...}
    feats = client.observation_hidden_states(obs, "Craftax-Classic-Symbolic-v1")   # float32 [N, D]
    feats = client.hidden_states(["Health 9, food 9, drink 9, energy 9."])

It has ``hidden_states(texts)``, ``hidden_size``, ``num_layers`` and ``spec`` like a local backend
(``utils.llm.LLMBackend``), so code that computes features can take either, e.g.
``utils.llm.observation_features(client, obs, env)``. Big batches are split into requests of the
server's ``max_batch`` (sent one after another on one keep-alive connection; the server gathers
concurrent clients' requests into shared model calls).

Every failure raises ``utils.llm.LLMError`` with the server's one-line reason: an unreachable
server, a 4xx for bad input, a 5xx, or an answer of the wrong shape. The predecessor turned a failed
request into zero vectors, which trained policies on garbage without a word; this never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from utils.llm import LLMError, LLMSpec

__all__ = ["HiddenStateClient"]

HIDDEN_STATES_PATH = "/v1/hidden_states"
HEALTH_PATH = "/health"
_START_HINT = "start one with: python -m servers.hidden_state_server --model MODEL"


class HiddenStateClient:
    """Hidden states from a running server, over one keep-alive HTTP connection."""

    def __init__(self, url: str, timeout: float = 60.0):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise LLMError(f"hidden-state server URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self._httpx = httpx
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self._info: dict[str, Any] | None = None

    # -- what the server computes ----------------------------------------------------------------

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """The server's /health: model, layer, layer_index, pooling, dim, max_batch, ... (cached)."""
        if self._info is None or refresh:
            self._info = self._request("GET", HEALTH_PATH)
        return self._info

    @property
    def hidden_size(self) -> int:
        return int(self.info()["dim"])

    @property
    def num_layers(self) -> int:
        return int(self.info()["num_layers"])

    @property
    def spec(self) -> LLMSpec:
        """The server's model, layer, pooling and prompt as an LLMSpec (for manifests, checks)."""
        info = self.info()
        return LLMSpec(model=info["model"], layer=int(info["layer"]), pooling=info["pooling"],
                       template=info["template"], system_prompt=info.get("system_prompt"),
                       backend=info.get("backend", "transformers"))

    # -- hidden states ---------------------------------------------------------------------------

    def hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim] hidden states of ``texts`` (the server applies its template)."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        texts = list(texts)
        return self._batched(len(texts), lambda lo, hi: {"texts": texts[lo:hi]})

    def observation_hidden_states(self, obs: np.ndarray, env_name: str) -> np.ndarray:
        """float32 [N, dim] hidden states of symbolic observations ``[N, obs_dim]`` of ``env_name``,
        rendered to the canonical text on the server (the same text labelling uses)."""
        obs = np.asarray(obs)
        if obs.ndim != 2:
            raise LLMError(f"observation_hidden_states expects a batch [N, obs_dim], got shape "
                           f"{obs.shape}; add a leading axis for one observation")
        rows = obs.astype(np.float32, copy=False)  # float32 -> JSON -> float32 is exact
        return self._batched(len(rows), lambda lo, hi: {"env": env_name,
                                                        "observations": rows[lo:hi].tolist()})

    def _batched(self, count: int, payload) -> np.ndarray:
        dim = self.hidden_size
        out = np.empty((count, dim), dtype=np.float32)
        step = int(self.info()["max_batch"])
        for lo in range(0, count, step):
            hi = min(lo + step, count)
            answer = self._request("POST", HIDDEN_STATES_PATH, json=payload(lo, hi))
            out[lo:hi] = self._vectors(answer, hi - lo, dim)
        return out

    def _vectors(self, answer: dict[str, Any], rows: int, dim: int) -> np.ndarray:
        try:
            vectors = np.asarray(answer["vectors"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as error:
            raise LLMError(f"hidden-state server at {self.url} sent an answer without proper "
                           f"'vectors' ({error})") from None
        if vectors.shape != (rows, dim):
            raise LLMError(f"hidden-state server at {self.url} sent vectors of shape "
                           f"{vectors.shape} for {rows} inputs of dim {dim}; did it restart with "
                           "another model? (client.info(refresh=True))")
        if not np.isfinite(vectors).all():
            raise LLMError(f"hidden-state server at {self.url} sent non-finite vectors")
        return vectors

    # -- HTTP ------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        httpx = self._httpx
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise LLMError(f"hidden-state server at {self.url} did not answer {path} within "
                           f"{self._http.timeout.read} s; raise the client's timeout or check the "
                           "server's load") from None
        except httpx.TransportError as error:
            raise LLMError(f"cannot reach the hidden-state server at {self.url} "
                           f"({type(error).__name__}: {error}); is it running? {_START_HINT}") from None
        if response.status_code >= 400:
            raise LLMError(f"hidden-state server at {self.url} answered {path} with HTTP "
                           f"{response.status_code}: {_detail(response)}")
        try:
            return response.json()
        except ValueError:
            raise LLMError(f"hidden-state server at {self.url} answered {path} with something that "
                           "is not JSON; is the URL right?") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HiddenStateClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detail(response) -> str:
    """The server's one-line reason, or the start of whatever else answered."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return str(body)[:200]
