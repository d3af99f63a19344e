"""``POST /v1/chat/completions``: messages through the checkpoint's chat template, streamed or not.

This module checks and submits the request (``start_chat``: ``protocol.ChatRequest``'s checks and params, the tool plan,
the template, ``limits.fit_params``); the answer, its stream and its tool calls are ``chat_reply.py``'s.
``max_completion_tokens`` (or the older ``max_tokens``) defaults to the room left under ``max_model_len``.
``logprobs=true`` with ``top_logprobs=k`` (k <= 20) gives per token its text, bytes, logprob and the k most likely
tokens'.  A stream first sends each choice's ``{"role": "assistant", "content": ""}`` delta, then content deltas
(one chunk per choice per engine step that produced text), the finish reason, the usage chunk if
``stream_options.include_usage``, and ``data: [DONE]``.  Image parts (``image_url``: a data URL or a local path)
are taken by vision-language models and refused, with a 400, by the others.  ``tools`` and ``tool_choice``
(``tool_calls.py``) give a message with ``tool_calls``, finishing on "tool_calls".  ``response_format`` and vLLM's
``structured_outputs`` constrain the output (``structured.py``).  ``chat_template_kwargs`` (over
``--default-chat-template-kwargs``) are template variables.  A reasoning parser (``--reasoning-parser``) takes the
reasoning out of ``content`` into ``reasoning`` and ``reasoning_content``; tool calls are read from the rest.
"""
from starlette.responses import JSONResponse, Response

from nanovllm.entrypoints.chat_reply import ChatReply
from nanovllm.entrypoints.limits import fit_params
from nanovllm.entrypoints.protocol import ChatRequest, bad_request, check_model
from nanovllm.entrypoints.serving import Serving, request_id
from nanovllm.entrypoints.sse import EventStreamResponse, unless_disconnected
from nanovllm.entrypoints.tool_calls import ToolPlan, chat_tools
from nanovllm.multimodal import chat_prompt


async def create_chat_completion(serving: Serving, req: ChatRequest, request) -> Response:
    handles, prompt_len, plan = await start_chat(serving, req)
    reply = ChatReply(serving, req, request_id("chatcmpl"), prompt_len, plan)
    if req.stream:
        return EventStreamResponse(reply.stream(handles), on_close=lambda: serving.abort(handles))
    body = await unless_disconnected(request, reply.collect(handles))
    return JSONResponse(body) if body is not None else Response(status_code=499)


async def start_chat(serving: Serving, req: ChatRequest) -> tuple[list, int, ToolPlan | None]:
    """Check ``req``, render its messages through the chat template and submit it: (the engine handles, the
    prompt's token count, the tool plan or None).  Shared with Anthropic's ``/v1/messages`` (``messages.py``)."""
    req.check_unsupported()  # before anything of serving is read: a refused request never reaches it
    lora = check_model(req.model, serving.model_name, serving.loras.adapters if serving.loras is not None else None)
    params = req.chat_params(serving.defaults, serving.prompts.vocab_size)
    plan, constraint = chat_tools(req, serving.tool_parser)
    # markup that is a special token stays in the text: the tool parser's ([TOOL_CALLS]), the reasoning parser's
    # tags (gpt_oss's harmony channels)
    keep_special = (plan is not None and not plan.skip_special_tokens) or (
        serving.reasoning_parser is not None and serving.reasoning_parser.keeps_special_tokens)
    try:
        messages, images = chat_prompt([m.template_dict(i) for i, m in enumerate(req.messages)])
    except (ValueError, KeyError, TypeError) as e:
        raise bad_request(f"an image part is malformed: {e}", "messages") from None
    try:
        ids = await serving.batch_tokenizer.call(serving.prompts.apply_chat_template, messages,
                                               plan.render if plan is not None else None,
                                               {**serving.chat_template_kwargs, **(req.chat_template_kwargs or {})})
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages (jinja raise_exception)
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
    image_inputs = None
    if images:  # placeholders in the text, the images beside it (nanovllm/multimodal.py)
        try:
            ids, image_inputs = serving.prompts.encode_request({"prompt_token_ids": ids,
                                                            "multi_modal_data": {"image": images}})
        except (ValueError, TypeError) as e:
            raise bad_request(str(e).replace("prompt 0", "the conversation"), "messages") from None
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = fit_params(params, serving.max_model_len, len(ids), getattr(req, field), field,
                        structured_outputs=constraint,
                        skip_special_tokens=params.skip_special_tokens and not keep_special)
    return serving.submit([(ids, params, image_inputs)], req.n, lora), len(ids), plan
