"""Sample from a teacher server with the Generate client API: a text prompt, two samples, streamed as they come.

Run a teacher (the embedded SmolLM2-135M-Instruct; CPU is fine) and this script against it:

    .venv/bin/asymkd serve --model default --port 50051 &
    .venv/bin/python examples/generate.py --target 127.0.0.1:50051

The server tokenizes the text prompt and decodes the samples (return_text); the same seed gives the same
samples again. Stop the server with `kill %1` (SIGTERM: it drains, then exits).
"""

from __future__ import annotations

import argparse

from teacher_server.client import TeacherClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the teacher's host:port")
    parser.add_argument("--prompt", default="The three primary colors are")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    with TeacherClient(args.target, timeout_s=300) as client:
        print(f"teacher: {client.info().model}\nprompt: {args.prompt!r}")
        options = dict(
            n=2,
            max_new_tokens=args.max_new_tokens,
            temperature=0.8,
            top_p=0.95,
            seed=args.seed,
            return_text=True,
        )
        texts = ["", ""]
        print("sample 0: ", end="")
        for chunk in client.generate_stream([args.prompt], **options):  # both samples' chunks, interleaved
            texts[chunk.sample_index] += chunk.text
            if chunk.sample_index == 0:  # sample 0 printed live, as its tokens arrive
                print(chunk.text, end="", flush=True)
        print(f"\nsample 1: {texts[1]}")

        # The whole samples at once, with token ids and per-token log-probs; the same seed, the same samples.
        (samples,) = client.generate([args.prompt], **options)
        for i, s in enumerate(samples):
            assert s.text == texts[i], "same seed, same samples"
            print(f"sample {i}: {s.token_ids.numel()} tokens, mean logprob {s.logprobs.mean():.3f}")


if __name__ == "__main__":
    main()
