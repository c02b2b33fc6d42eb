"""vLLM's /tokenize and /detokenize: a named expert's tokenizer and chat template over HTTP, so that a
client can count a prompt's tokens against the expert's context (`max_model_len`) before it sends it,
or find the ids that `logit_bias` and `stop_token_ids` name. Behind the API key like /v1/. Tokenizing
runs on a worker thread, as for the generation endpoints: the event loop streams to everyone."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from coeserve.server import tools as toolkit
from coeserve.server.app import VIRTUAL, expert_named
from coeserve.server.schemas import DetokenizeRequest, TokenizeRequest
from coeserve.server.state import ApiError


def _expert(state, model: str) -> str:
    if model == VIRTUAL:
        raise ApiError(400, "name an expert: each has its own tokenizer, and the router picks one per prompt",
                       param="model")
    return expert_named(state, model)


def add_routes(app, state) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        expert = _expert(state, body.model)
        codec = await run_in_threadpool(state.codec, expert)
        if body.messages is not None:  # as the chat endpoint builds the prompt (tools included)
            msgs, specs = toolkit.prompt([m.plain() for m in body.messages], body.tools or [], codec.takes_tools)
            try:
                ids = (await run_in_threadpool(codec.chat_prompt, msgs, body.add_generation_prompt, specs))[0]
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
        else:
            ids = await run_in_threadpool(codec.encode, body.prompt, body.add_special_tokens)
        out = {"count": len(ids), "max_model_len": state.context(expert), "tokens": ids, "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [codec.piece(i)[0] for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        expert = _expert(state, body.model)
        if body.tokens and max(body.tokens) >= state.vocab(expert):
            raise ApiError(400, f"token id {max(body.tokens)} is not in {expert}'s vocabulary of "
                           f"{state.vocab(expert)}", param="tokens")
        codec = await run_in_threadpool(state.codec, expert)
        return {"prompt": await run_in_threadpool(codec.decode, body.tokens, skip_special=False)}
