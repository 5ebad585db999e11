"""Recording a transcript by hand, in server/transcript.py's format: what the audit tests feed collafuse-audit."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch

from collafuse.common.codec import encode
from collafuse.v1 import collafuse_pb2


def transcript_line(seq: int, method: str, message: Any, direction: str = "request") -> str:
    """One line of server/transcript.jsonl."""
    return json.dumps({"seq": seq, "time": float(seq), "method": f"/collafuse.v1.CollaFuse/{method}",
                       "request_type": message.DESCRIPTOR.full_name, "peer": "ipv4:127.0.0.1:1", "direction": direction,
                       "payload_b64": base64.b64encode(message.SerializeToString()).decode("ascii")})


def split_step_lines(seq: int, client_id: str, step: int, x_t: torch.Tensor, t: torch.Tensor, labels: list[int],
                     eps_hat: torch.Tensor, grad: torch.Tensor) -> list[str]:
    """One split step as the server records it: the forward request, its reply and the backward request
    (numbered seq + 1 .. seq + 3)."""
    forward = collafuse_pb2.SplitForwardRequest(client_id=client_id, x_t=encode(x_t.contiguous()), t=t.tolist(),
                                                labels=labels)
    reply = collafuse_pb2.SplitForwardReply(step_id=f"s{step}", eps_hat=encode(eps_hat.contiguous()), server_step=step)
    backward = collafuse_pb2.SplitBackwardRequest(client_id=client_id, step_id=f"s{step}", grad=encode(grad.contiguous()))
    return [transcript_line(seq + 1, "SplitForward", forward), transcript_line(seq + 2, "SplitForward", reply, "reply"),
            transcript_line(seq + 3, "SplitBackward", backward)]


def write_transcript(run: Path, lines: list[str]) -> None:
    (run / "server").mkdir(parents=True, exist_ok=True)
    (run / "server" / "transcript.jsonl").write_text("\n".join(lines) + "\n")
