"""Talk to a running text generation server (tools/run_text_generation_server.py).

    python tools/text_generation_cli.py localhost:5000                    # interactive
    python tools/text_generation_cli.py localhost:5000 --prompt "Hello" --tokens 20   # one shot

Interactive mode asks for a prompt and the number of tokens to generate, prints the text, and
repeats until end of input (Ctrl-D). One-shot mode prints the generated text (prompt included) and
exits with status 1 and the server's error on stderr if the request is refused.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


def request(host: str, payload: dict, timeout: float) -> dict:
    url = host if host.startswith("http") else f"http://{host}"
    req = urllib.request.Request(url.rstrip("/") + "/api", data=json.dumps(payload).encode(), method="PUT",
                                 headers={"Content-Type": "application/json; charset=UTF-8"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            info = json.loads(body)
            message = f"{info.get('error')} (field: {info.get('field')})"
        except ValueError:
            message = body
        raise RuntimeError(f"the server refused the request (HTTP {exc.code}): {message}") from None


def build_payload(args, prompt: str, tokens: int) -> dict:
    payload = {"prompts": [prompt], "tokens_to_generate": tokens}
    for name in ("temperature", "top_k", "top_p", "random_seed"):
        value = getattr(args, name)
        if value is not None:
            payload[name] = value
    if args.logprobs:
        payload["logprobs"] = True
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", help="host:port of the server, e.g. localhost:5000")
    parser.add_argument("--prompt", default=None, help="one-shot mode: generate from this prompt and exit")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate in one-shot mode")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", dest="top_k", type=int, default=None)
    parser.add_argument("--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--random-seed", dest="random_seed", type=int, default=None)
    parser.add_argument("--logprobs", action="store_true", help="also print the log-probabilities")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)

    def run(prompt: str, tokens: int) -> None:
        answer = request(args.host, build_payload(args, prompt, tokens), args.timeout)
        print(answer["text"][0])
        if args.logprobs and answer.get("logprobs"):
            print(json.dumps(answer["logprobs"][0]))

    if args.prompt is not None:
        try:
            run(args.prompt, args.tokens)
        except (RuntimeError, OSError) as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    while True:
        try:
            prompt = input("Enter prompt: ")
            tokens_text = input("Enter number of tokens to generate: ")
        except EOFError:
            print()
            return 0
        try:
            tokens = int(tokens_text)
        except ValueError:
            print(f"not a number of tokens: {tokens_text!r}", file=sys.stderr)
            continue
        try:
            run(prompt, tokens)
        except (RuntimeError, OSError) as exc:
            print(exc, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
