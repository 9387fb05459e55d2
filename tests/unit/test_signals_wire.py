"""Payload encodings and the data-plane / output-layer contract pieces, without a network: packed ids on the
wire (TOP_K, SAMPLED's -1 padding, counts, AT_IDS requests), RemoteTensor descriptors, the new GetInfo fields,
the output layer's fingerprint check, the config keys.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from asymkd.contract import DataPlane, IdEncoding, OutputLayerInfo, SequenceScores, Signal, TeacherInfo
from asymkd.packing import id_bits, pack_tensor, packed_nbytes
from asymkd.remote import RemoteRef, fill_remote, output_layer_fingerprint
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import (
    DataLossError,
    ScoreQuery,
    WireError,
    decode_pieces,
    info_from_proto,
    info_to_proto,
    scores_to_proto,
    tensor_from_proto,
)
from student_trainer.config import TeacherSection
from student_trainer.sources.common import TeacherCompatError
from student_trainer.teacher_head import check_output_layer
from teacher_server.validation import Limits, RequestError, parse_score_request, parse_transport

V = 49_152


def test_top_k_ids_travel_in_ceil_log2_v_bits():
    ids = torch.randint(0, V, (7, 64), generator=torch.Generator().manual_seed(0))
    s = SequenceScores(
        ids=ids, logprobs=torch.randn(7, 64), tail_logprob=torch.randn(7), target_logprob=torch.randn(7)
    )
    msg = scores_to_proto(s, 0, id_bits=id_bits(V))
    assert msg.ids.dtype == pb.PACKED_UINT and msg.ids.bits == 16 == id_bits(V)
    assert len(msg.ids.data) == packed_nbytes(7 * 64, 16) == 7 * 64 * 2  # half of int32
    back = decode_pieces([pb.SequenceScores.FromString(msg.SerializeToString())])
    assert torch.equal(back.ids, ids) and back.ids.dtype == torch.int64
    assert torch.equal(back.logprobs, s.logprobs)


def test_sampled_padding_and_counts_round_trip_packed():
    ids = torch.tensor([[3, 9, -1, -1], [0, 1, 2, V - 1]])
    counts = torch.tensor([[3, 1, 0, 0], [1, 1, 1, 1]])
    s = SequenceScores(ids=ids, counts=counts, logprobs=torch.zeros(2, 4), target_logprob=torch.zeros(2))
    msg = scores_to_proto(s, 0, id_bits=id_bits(V))
    assert msg.ids.offset == -1 and msg.counts.dtype == pb.PACKED_UINT and msg.counts.bits == 2
    back = decode_pieces([msg])
    assert torch.equal(back.ids, ids) and torch.equal(back.counts, counts)


def test_packed_at_ids_reach_the_server_intact_and_bad_packing_names_the_field():
    limits = Limits(V, 64, 512, 64, 65536, frozenset({Signal.AT_IDS}))
    at = [torch.randint(0, V, (5, 8), generator=torch.Generator().manual_seed(1))]
    query = ScoreQuery([list(range(6))], signal="at_ids", at_ids=at, id_encoding=IdEncoding.PACKED_IDS)
    req = query.to_proto("r")
    assert req.sequences[0].at_ids.dtype == pb.PACKED_UINT and req.id_encoding == pb.PACKED_IDS
    items, _ = parse_score_request(req, limits)
    assert torch.equal(items[0].at_ids, at[0])
    assert parse_transport(req, limits).id_bits == 16
    req.sequences[0].at_ids.bits = 0
    with pytest.raises(RequestError, match=r"sequences\[0\]\.at_ids\.bits"):
        parse_score_request(req, limits)
    req.id_encoding = 9
    with pytest.raises(RequestError, match="id_encoding: unknown value 9"):
        parse_transport(req, limits)


def test_a_packed_tensor_with_the_wrong_length_is_refused():
    t = pack_tensor(torch.arange(10), 4)
    t.data = t.data[:-1]
    with pytest.raises(WireError, match=r"ids\.data"):
        tensor_from_proto(t, "ids")


def test_remote_tensor_descriptor_and_rows():
    ref = RemoteRef("full", torch.bfloat16, (7, 11), 3)
    assert RemoteRef.from_proto(pb.RemoteTensor.FromString(ref.to_proto().SerializeToString())) == ref
    results = [SequenceScores(target_logprob=torch.zeros(3)), SequenceScores(target_logprob=torch.zeros(4))]
    rows = torch.randn(7, 11)
    fill_remote(results, ref, rows, [3, 4])
    assert torch.equal(results[1].full, rows[3:])
    with pytest.raises(DataLossError, match="6 rows for 7"):
        fill_remote(results, ref, rows[:6], [3, 4])
    with pytest.raises(DataLossError):
        RemoteRef.from_proto(pb.RemoteTensor(field="ids", dtype=pb.INT32, shape=[2, 2]))


def test_get_info_round_trips_the_new_facts():
    layer = OutputLayerInfo("ab" * 16, "bfloat16", 0.5, 30.0, True)
    info = TeacherInfo(
        model="m", vocab_size=V, signals=tuple(Signal), value_dtypes=(pb.FLOAT32, pb.BFLOAT16),
        id_encodings=tuple(IdEncoding), data_planes=(DataPlane.GRPC, DataPlane.TORCH), output_layer=layer,
    )  # fmt: skip
    assert info_from_proto(pb.TeacherInfo.FromString(info_to_proto(info).SerializeToString())) == info
    assert info_from_proto(info_to_proto(TeacherInfo())).output_layer is None


def test_the_output_layer_check_refuses_another_layer():
    w, b = torch.randn(20, 8), torch.randn(20)
    layer = OutputLayerInfo(output_layer_fingerprint(w, b, 1.0, 0.0), "float32", 1.0, 0.0, True)
    info = TeacherInfo(model="m", vocab_size=20, hidden_size=8, output_layer=layer)
    assert check_output_layer(w, b, info) == layer
    w2 = w.clone()
    w2[7, 3] = torch.nextafter(w2[7, 3], torch.tensor(1e9))  # one ulp
    with pytest.raises(TeacherCompatError, match="fingerprint"):
        check_output_layer(w2, b, info)
    with pytest.raises(TeacherCompatError, match="fingerprint"):  # the extras are part of it
        check_output_layer(
            w, b, dataclasses.replace(info, output_layer=dataclasses.replace(layer, logit_scale=2.0))
        )
    with pytest.raises(TeacherCompatError, match=r"\(vocab_size 21"):
        check_output_layer(w, b, dataclasses.replace(info, vocab_size=21))
    with pytest.raises(TeacherCompatError, match="dtype bfloat16"):
        check_output_layer(w.bfloat16(), b, info)


def test_data_plane_key():
    assert TeacherSection(targets=["h:1"], data_plane="torch").data_plane == "torch"
    with pytest.raises(ValueError, match="data_plane='torch' needs teacher servers"):
        TeacherSection(cache="/c", data_plane="torch")


def test_the_teacher_drops_results_whose_answer_was_lost_and_bounds_what_it_holds():
    from teacher_server.data_plane import DataPlaneServer, Session, SessionClosed

    plane = DataPlaneServer("127.0.0.1", max_pending=3)
    session = Session(plane, "s", b"t" * 32, "gloo")  # no peer: only the holding logic
    tags = [session.put(torch.full((2, 3), float(i))) for i in range(3)]
    session.put_at[tags[0]] -= 100.0  # made long before the others: its answer was lost
    assert torch.equal(session._take(tags[2], timeout_s=60.0), torch.full((2, 3), 2.0))
    assert list(session.pending) == [tags[1]]  # tags[0] dropped, tags[1] kept (not stale)
    for _ in range(4):
        session.put(torch.zeros(1))
    assert len(session.pending) == 3 and session.pending_bytes == 3 * 4  # the oldest went first
    with pytest.raises(SessionClosed, match="not held"):
        session._take(tags[0], timeout_s=0.01)
