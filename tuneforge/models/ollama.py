"""Ollama's side of `tuneforge export --format gguf --ollama`: a Modelfile whose TEMPLATE and stop strings say what
the run's chat template says. Ollama templates are Go templates, which tuneforge writes for the chat formats it knows
(CHAT_FORMATS) and renders itself (`render_go_template`, the subset those use), so the export compares the two
renderings of a probe conversation before it writes anything; a chat template it cannot match is a one-line error,
and the GGUF file (which carries the chat template itself) is still the way to run such a model."""
from __future__ import annotations

import re

from tuneforge.errors import UserError

# Chat formats an Ollama TEMPLATE is written for: (marker in the rendered conversation, template, stop strings).
# Only the constructs render_go_template reads; the export renders both templates and compares before writing.
CHAT_FORMATS = {
    "chatml": ("<|im_start|>user\n", "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n", ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n",
               "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}
PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def render_go_template(template: str, messages: list[dict], prompt: str = "") -> str:
    """Ollama's template language, the subset CHAT_FORMATS uses: text, {{ .Role }} / {{ .Content }} inside
    {{ range .Messages }} ... {{ end }}, and {{ .Prompt }}. Anything else raises ValueError."""
    parts = re.split(r"({{.*?}})", template)
    out, i = [], 0
    while i < len(parts):
        part = parts[i]
        if not part.startswith("{{"):
            out.append(part)
        elif part.strip("{} ") == ".Prompt":
            out.append(prompt)
        elif part.strip("{} ") == "range .Messages":
            end = next((j for j in range(i + 1, len(parts)) if parts[j].strip("{} ") == "end"), None)
            if end is None:
                raise ValueError("range without end")
            body = parts[i + 1:end]
            for message in messages:
                for piece in body:
                    field = piece.strip("{} ")
                    if not piece.startswith("{{"):
                        out.append(piece)
                    elif field in (".Role", ".Content"):
                        out.append(message[field[1:].lower()])
                    else:
                        raise ValueError(f"unsupported inside range: {piece}")
            i = end
        else:
            raise ValueError(f"unsupported template action: {part}")
        i += 1
    return "".join(out)


def _render_jinja(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # llama.cpp and Ollama add bos as a token (add_bos_token), not as template text
    return text


def chat_format(tokenizer) -> tuple[str, str, list[str], str | None]:
    """(format name, Ollama TEMPLATE, stop strings, the template's own default system prompt) of the tokenizer's
    chat template, checked: the TEMPLATE renders PROBE exactly as the chat template does."""
    if not tokenizer.chat_template:
        return "plain", "{{ .Prompt }}", [tokenizer.eos_token] if tokenizer.eos_token else [], None
    rendered = _render_jinja(tokenizer, PROBE)
    name = next((n for n, (marker, _, _) in CHAT_FORMATS.items() if marker in rendered), None)
    if name is None:
        raise UserError("tokenizer: its chat template is not one tuneforge writes an Ollama TEMPLATE for (ChatML, "
                        "Llama 3); export without --ollama (the GGUF file carries the chat template itself)")
    _, template, stops = CHAT_FORMATS[name]
    if render_go_template(template, PROBE) != rendered:
        raise UserError(f"tokenizer: its chat template is {name}-like but renders differently from the Ollama "
                        "TEMPLATE tuneforge would write; export without --ollama (the GGUF file carries the chat "
                        "template itself)")
    default_system = None
    alone = _render_jinja(tokenizer, PROBE[1:2])
    without = render_go_template(template, PROBE[1:2])
    if alone != without:  # the template adds a system turn of its own when none is given
        for candidate in _system_candidates(alone, template):
            if render_go_template(template, [{"role": "system", "content": candidate}] + PROBE[1:2]) == alone:
                default_system = candidate
                break
        else:
            raise UserError("tokenizer: its chat template adds text an Ollama TEMPLATE cannot reproduce; export "
                            "without --ollama")
    return name, template, stops, default_system


def _system_candidates(rendered: str, template: str) -> list[str]:
    head, _, rest = template.partition("{{ .Role }}")
    between, _, _ = rest.partition("{{ .Content }}")
    start = rendered.find("system" + between)
    if start < 0:
        return []
    body = rendered[start + len("system" + between):]
    end_marker = rest.partition("{{ .Content }}")[2].partition("{{ end }}")[0]
    return [body.split(end_marker)[0]] if end_marker and end_marker in body else []


def modelfile_text(gguf_name: str, template: str, stops: list[str], system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")  # greedy, as tuneforge generate and the SQuAD eval decode
    return "\n".join(lines) + "\n"
