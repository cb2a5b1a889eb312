"""Every string the page shows, in English and Simplified Chinese, declared once.

``I18N`` is the ``gr.I18n`` Gradio's front end translates labels with (in the browser's language
when the page first paints); ``text(key, lang)`` is the same string on the server, for what the
page builds itself (the statistics line, errors, markers, the model chip, examples) and for the
language switch, which re-labels every component in the chosen language.
"""

from __future__ import annotations

import re

import gradio as gr

LANGUAGES = ("en", "zh-CN")
LANGUAGE_NAMES = {"en": "English", "zh-CN": "中文"}

STRINGS: dict[str, tuple[str, str]] = {
    # the top bar and the drawer
    "settings": ("Chat settings", "对话设置"),
    "open_settings": ("⚙ Settings", "⚙ 设置"),
    "language": ("Language", "语言"),
    "model_details": ("About the model", "模型信息"),
    "mode": ("Mode", "模式"),
    "mode_info": ("Chat: plain conversation. Tools: the model may call the built-in tools (calculator, time, units, "
                  "documents).", "对话：普通聊天。工具：模型可以调用内置工具（计算器、时间、单位换算、文档检索）。"),
    "mode_info_interpreter": (" Code interpreter: the model writes Python that runs in a sandbox on this server, "
                              "and sees its output.", " 代码解释器：模型编写的 Python 代码在本服务器的沙箱中运行，模型能看到运行结果。"),
    "mode_unavailable": ("Tools and Code interpreter need ChatGLM3; {model} cannot call tools, so only Chat is offered.",
                         "工具和代码解释器需要 ChatGLM3；{model} 不能调用工具，因此只提供对话模式。"),
    "Chat": ("Chat", "对话"),
    "Tools": ("Tools", "工具"),
    "Code interpreter": ("Code interpreter", "代码解释器"),
    "system_prompt": ("System prompt (Chat mode)", "系统提示词（对话模式）"),
    "system_prompt_info": ("Instructions the model sees before the conversation.", "模型在对话之前看到的指令。"),
    "temperature": ("Temperature", "温度"),
    "temperature_info": ("Higher is more varied, lower more focused; 0 always picks the likeliest token.",
                         "越高越多样，越低越集中；0 总是选择概率最高的词。"),
    "top_p": ("Top-p", "Top-p"),
    "top_p_info": ("Sample only from the likeliest tokens whose probabilities add up to this.",
                   "只从累计概率达到该值的最可能的词中采样。"),
    "max_new_tokens": ("Max new tokens", "最大生成长度"),
    "max_new_tokens_info": ("The longest reply, in tokens.", "回复的最大长度（token 数）。"),
    "top_k": ("Top-k", "Top-k"),
    "top_k_info": ("Sample only from this many likeliest tokens; 0 means no limit.", "只从概率最高的这么多个词中采样；0 表示不限。"),
    "repetition_penalty": ("Repetition penalty", "重复惩罚"),
    "repetition_penalty_info": ("Above 1 makes repeating earlier tokens less likely.", "大于 1 时降低重复已出现内容的概率。"),
    "seed": ("Seed", "随机种子"),
    "seed_info": ("The same seed and settings give the same reply; -1 picks a random seed.",
                  "相同的种子和设置得到相同的回复；-1 表示随机。"),
    "downloads": ("Download the conversation", "下载对话"),
    "download_md": ("Markdown", "Markdown"),
    "download_json": ("JSON", "JSON"),
    # the chat
    "chat_label": ("Conversation", "对话"),
    "message_label": ("Message", "消息"),
    "input_placeholder_plain": ("Type a message…", "输入消息…"),
    "input_placeholder": ("Message {model}…", "给 {model} 发消息…"),
    "send": ("Send", "发送"),
    "stop": ("Stop", "停止"),
    "empty_chat": ("Ask anything, in Chinese or English.", "用中文或英文问任何问题。"),
    # the conversation list
    "conversations": ("Conversations", "对话列表"),
    "new_chat": ("＋ New chat", "＋ 新对话"),
    "search_conversations": ("Search titles…", "搜索标题…"),
    "untitled": ("New conversation", "新对话"),
    "this_conversation": ("This conversation", "当前对话"),
    "conversation_title": ("Title", "标题"),
    "conversation_title_info": ("Enter renames it; empty gives back the automatic title.", "按回车重命名；留空则恢复自动标题。"),
    "delete_conversation": ("🗑 Delete", "🗑 删除"),
    "undo_delete": ("↶ Undo delete", "↶ 撤销删除"),
    "deleted": ("Deleted “{title}”.", "已删除“{title}”。"),
    "export_all": ("⬇ Export all", "⬇ 导出全部"),
    "import": ("⬆ Import", "⬆ 导入"),
    "imported": ("Imported {count} conversation(s).", "已导入 {count} 个对话。"),
    "import_failed": ("Cannot import this file: {error}", "无法导入该文件：{error}"),
    "import_too_large": ("The file is too large: {size:,} bytes, the limit is {limit:,}.", "文件太大：{size:,} 字节，上限是 {limit:,}。"),
    "list_count": ("{count} of {max} conversations · {used} of {limit} MB kept in this browser",
                   "本浏览器保存了 {count}/{max} 个对话 · {used}/{limit} MB"),
    "dropped_oldest": ("To stay within the limit, the oldest conversations were removed: {titles}.",
                       "为了不超出上限，已删除最早的对话：{titles}。"),
    "too_large_to_keep": ("This conversation is larger than the {limit} MB one conversation may take in the browser, so "
                          "it is not kept; download it to keep it.", "此对话超过了浏览器中单个对话可占用的 {limit} MB，因此没有保存；请下载保存。"),
    # versions (Edit and Regenerate keep the earlier one)
    "previous_version": ("Previous version", "上一个版本"),
    "next_version": ("Next version", "下一个版本"),
    "versions_of": ("Versions of this message", "此消息的版本"),
    "not_editable": ("Only your own messages can be edited.", "只能编辑你自己的消息。"),
    # share links
    "share": ("🔗 Share link", "🔗 分享链接"),
    "share_link": ("Share link (read-only: anyone with the link can read this conversation)",
                   "分享链接（只读：任何拿到链接的人都能阅读此对话）"),
    "share_empty": ("There is nothing to share yet.", "还没有可以分享的内容。"),
    "share_too_long": ("This conversation is too long for a link: {chars:,} characters, the limit is {limit:,}. "
                       "Download it as JSON instead.", "此对话太长，无法放进链接：{chars:,} 个字符，上限是 {limit:,}。请改为下载 JSON。"),
    "share_unreadable": ("This share link cannot be opened: {error}.", "无法打开此分享链接：{error}。"),
    "shared_banner": ("Shared conversation, read-only · {model} · {precision} · temperature {temperature} · top-p "
                      "{top_p} · seed {seed}", "分享的对话（只读）· {model} · {precision} · 温度 {temperature} · top-p "
                      "{top_p} · 种子 {seed}"),
    "read_only": ("This shared conversation is read-only; “Continue this conversation” makes it yours.",
                  "这是只读的分享对话；点击“继续此对话”即可在自己的对话中继续。"),
    "replay": ("↻ Replay the last reply", "↻ 重放最后一条回复"),
    "continue_shared": ("Continue this conversation", "继续此对话"),
    "replaying": ("Replaying with seed {seed}…", "正在使用种子 {seed} 重放…"),
    "replay_same": ("✓ Replayed with seed {seed}: the same reply, word for word.", "✓ 使用种子 {seed} 重放：回复逐字相同。"),
    "replay_differs": ("Replayed with seed {seed}: the new reply differs where marked (struck out: the shared reply; "
                       "underlined: the replay).", "使用种子 {seed} 重放：新回复在标记处不同（删除线：分享的回复；下划线：重放的回复）。"),
    "replay_other_model": (" This server runs {model} ({precision}); the link was made with {shared} ({shared_precision}).",
                           " 本服务器运行的是 {model}（{precision}）；链接生成时使用的是 {shared}（{shared_precision}）。"),
    # what the model sees
    "meter": ("{total:,} / {context:,} tokens · system {system:,} · history {history:,} · new {new:,}",
              "{total:,} / {context:,} tokens · 系统 {system:,} · 历史 {history:,} · 新消息 {new:,}"),
    "meter_dropped": (" · ⚠ the {count} oldest message(s) will be left out", " · ⚠ 最早的 {count} 条消息将被省略"),
    "meter_estimate": (" (estimated: the server applies its own template)", "（估算：服务器使用自己的模板）"),
    "view_prompt": ("What the model sees", "模型看到的内容"),
    "prompt_text": ("The exact prompt, with the model's role tokens", "完整提示（含模型的角色标记）"),
    # what the page says about the model
    "subtitle": ("{precision} · {device} · {context} tokens of context", "{precision} · {device} · 上下文 {context} tokens"),
    "demo_banner": ("Demo model {model} is answering; {wanted} is not available on this server.",
                    "当前由演示模型 {model} 回答；本服务器上没有 {wanted}。"),
    "details": ("Model {model} · precision {precision} · device {device} · context {context} tokens",
                "模型 {model} · 精度 {precision} · 设备 {device} · 上下文 {context} tokens"),
    # the statistics line
    "stats": ("prompt {prompt} tokens · reply {reply} tokens · {speed:.1f} tokens/s",
              "提示 {prompt} tokens · 回复 {reply} tokens · {speed:.1f} tokens/秒"),
    "queued": ("⏳ Waiting for a free slot… (position {position} in the queue)", "⏳ 正在排队…（第 {position} 位）"),
    "budget": (" · reply budget lowered to {tokens} tokens to fit the context", " · 为适应上下文，回复上限降为 {tokens} tokens"),
    "dropped": ("ℹ️ The conversation is longer than the model's context: the {count} oldest messages were left out "
                "of the prompt (the system prompt is kept).", "ℹ️ 对话超出了模型的上下文：最早的 {count} 条消息没有放入提示（系统提示词保留）。"),
    # how a reply ended (shown under it, kept in storage and downloads)
    "end_stopped": ("⏹ Stopped", "⏹ 已停止"),
    "end_length": ("✂ Cut off at the max-new-tokens limit", "✂ 达到最大生成长度，已截断"),
    "end_failed": ("⚠ Failed: {error}", "⚠ 失败：{error}"),
    "end_interrupted": ("⚠ Interrupted (the page was closed while the reply was streaming)", "⚠ 已中断（回复生成时页面被关闭）"),
    # documents attached to a message (page/attachments.py)
    "doc_attach": ("Attach a document ({accepted}; up to {limit}, {pages} pages, {chars:,} characters of text)",
                   "附加文档（{accepted}；最大 {limit}、{pages} 页、{chars:,} 个字符）"),
    "doc_remove": ("Remove {name}", "移除 {name}"),
    "doc_pending_note": ("goes with your next message", "将随下一条消息发送"),
    "doc_chip": ("{name} · {kind} · {tokens:,} tokens", "{name} · {kind} · {tokens:,} tokens"),
    "doc_kind_pages": ("{kind}, {pages} pages", "{kind}，{pages} 页"),
    "doc_kind_text": ("text file", "文本文件"),
    "doc_kind_markdown": ("Markdown file", "Markdown 文件"),
    "doc_kind_html": ("HTML page", "HTML 网页"),
    "doc_kind_pdf": ("PDF", "PDF"),
    "doc_kind_docx": ("Word document", "Word 文档"),
    "doc_attach_again": ("· no longer here: documents are kept only while the page is open; attach it again to "
                         "ask about it", "· 已不在服务器上：文档只在页面打开期间保留；如需继续提问请重新附加"),
    "doc_whole": ("📄 {name}: the whole document was in the prompt ({tokens:,} tokens).",
                  "📄 {name}：整篇文档都放入了提示（{tokens:,} tokens）。"),
    "doc_passages": ("📄 {name}: too long to read whole; the {count} passages most relevant to the question were "
                     "in the prompt ({included:,} of {total:,} tokens, {share}).",
                     "📄 {name}：文档太长，无法整篇放入；提示中放入了与问题最相关的 {count} 段（{total:,} tokens 中的 "
                     "{included:,}，{share}）。"),
    "doc_left_out": ("📄 {name}: left out of the prompt; the later conversation fills the context.",
                     "📄 {name}：没有放入提示；之后的对话已占满上下文。"),
    "doc_missing": ("📄 {name}: not in the prompt; documents are kept only while the page is open. Attach it "
                    "again to ask about it.", "📄 {name}：没有放入提示；文档只在页面打开期间保留。如需提问请重新附加。"),
    "doc_suggest": (" For the whole document, use a longer-context model such as {model}.",
                    " 如需整篇阅读，请使用上下文更长的模型，例如 {model}。"),
    "doc_no_room": ("There is no room in the prompt for {name}: the prompt may use {budget:,} of the model's "
                    "{context:,} tokens and the conversation without the documents takes {total:,}. Lower Max new "
                    "tokens or start a new conversation.",
                    "提示中没有空间放入 {name}：提示最多可用模型 {context:,} 个 token 中的 {budget:,} 个，而不含文档的对话已占 "
                    "{total:,} 个。请调低最大生成长度或开始新对话。"),
    "doc_too_many_chars": ("With its documents the message is {chars:,} characters long, over this server's limit of "
                           "{limit:,} characters for one message. Attach a shorter document.",
                           "加上文档后消息长 {chars:,} 个字符，超过了本服务器单条消息 {limit:,} 个字符的上限。请附加更短的文档。"),
    "doc_file_too_large": ("{name} is {size}; the page takes documents of up to {limit}.",
                           "{name} 大小为 {size}；页面接受的文档最大为 {limit}。"),
    "doc_unreadable": ("{name} could not be read by the browser.", "浏览器无法读取 {name}。"),
    "doc_too_many_pending": ("At most {count} documents go with one message; send this one first.",
                             "一条消息最多附加 {count} 个文档；请先发送这一条。"),
    "doc_too_many_session": ("This page already holds {count} documents, the limit; start a new page (reload) to "
                             "attach others.", "此页面已保存 {count} 个文档，已达上限；请重新加载页面后再附加。"),
    "doc_too_many_client": ("Your address already holds {count} documents on this server, the limit; close other "
                            "tabs of this page to attach more.", "你的地址在本服务器上已保存 {count} 个文档，已达上限；"
                            "请关闭此页面的其他标签页后再附加。"),
    "doc_session_chars": ("{name} was not kept: this page's documents may hold {limit:,} characters of text in all.",
                          "{name} 没有保存：此页面的文档总共最多 {limit:,} 个字符。"),
    "doc_client_chars": ("{name} was not kept: the documents of your address may hold {limit:,} characters of text "
                         "in all.", "{name} 没有保存：你的地址的文档总共最多 {limit:,} 个字符。"),
    "doc_server_full": ("{name} was not kept: the server holds as many documents as it can right now; try again "
                        "later.", "{name} 没有保存：服务器目前保存的文档已达上限；请稍后再试。"),
    "doc_too_many_reads": ("Too many documents read: at most {count} every {minutes} minutes from one address; try "
                           "again later.", "读取的文档太多：每个地址每 {minutes} 分钟最多 {count} 个；请稍后再试。"),
    # errors
    "error": ("⚠️ {error}", "⚠️ {error}"),
    "generation_failed": ("Generation failed: {error}", "生成失败：{error}"),
    "server_error": ("Something went wrong on the server; the error is in its log.", "服务器出错了；错误信息在服务器日志中。"),
    "busy_now": ("A reply is still being written; wait for it or press Stop.", "回复还在生成中；请等待或点击停止。"),
    "nothing_to_retry": ("There is no reply to retry yet.", "还没有可以重新生成的回复。"),
    "empty_message": ("Type a message first.", "请先输入消息。"),
}

#: The backend's errors a visitor meets most, as patterns, and their Chinese wording (numbers are kept);
#: any other error is shown as the backend wrote it.
ERRORS_ZH = [
    (re.compile(r"The server is busy: (\d+) replies are being written and (\d+) are waiting.*", re.S),
     r"服务器繁忙：\1 条回复正在生成，\2 条在排队。请稍后再试。"),
    (re.compile(r"(?:The system prompt|A message) is too long: ([\d,]+) characters, the limit is ([\d,]+)\..*", re.S),
     r"消息太长：\1 个字符，上限是 \2。请缩短或分成几条发送。"),
    (re.compile(r"The message is too long: the prompt needs (\d+) tokens but only (\d+) fit.*", re.S),
     r"消息太长：提示需要 \1 个 token，但只能容纳 \2 个（模型上下文减去回复所需空间）。请缩短消息或调低最大生成长度。"),
    (re.compile(r"The message is empty\."), "消息为空。"),
    (re.compile(r"The (\w[\w ]*) contains an invalid character.*", re.S),
     "文本中有无效字符（不成对的 UTF-16 代理项，例如从表情符号中间截断的文字）；请删除后重试。"),
    (re.compile(r"all (\d+) code interpreter kernels are running code; try again in about (\d+) s"),
     r"全部 \1 个代码解释器内核都在运行代码；请约 \2 秒后再试。"),
]


def _table(index: int) -> dict[str, str]:
    return {key: value[index] for key, value in STRINGS.items()}


I18N = gr.I18n(en=_table(0), **{"zh-CN": _table(1), "zh": _table(1)})


def i18n(key: str):
    """The label Gradio's front end translates (``key`` must be in ``STRINGS``)."""
    assert key in STRINGS, key
    return I18N(key)


def text(key: str, lang: str, **values) -> str:
    """``key`` in ``lang`` (English for any other language), with ``values`` filled in."""
    template = STRINGS[key][1 if lang == "zh-CN" else 0]
    return template.format(**values) if values else template


def translate_error(error: str, lang: str) -> str:
    """A backend error in ``lang``: Chinese for the errors known here, else the original text."""
    if lang != "zh-CN":
        return error
    for pattern, wording in ERRORS_ZH:
        if pattern.fullmatch(error):
            return pattern.sub(wording, error)
    return error


def language_of(accept_language: str | None) -> str:
    """The page language for an Accept-Language header: Chinese for any zh, else English."""
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return "en"
