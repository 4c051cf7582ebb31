"""The models of a run as ONE Megatron model chunk: policy, value network, frozen reference.

Why one module: DQO's two losses share their inputs (the policy's log-probs and the values feed the
lambda-returns of both), so the cheapest step runs the policy and the value network in the same
micro-batch and backpropagates the sum of the losses once; the stop-gradients inside the losses keep
each loss on its own parameters. Megatron's schedules, DDP and optimizer see one model, so pipeline
parallelism, gradient reduction and clipping work unchanged.

Pipeline parallelism: every member is split into the same stages. Between stages the members'
hidden states ``[s, mb, h]`` travel stacked along the micro-batch dimension (``[s, k*mb, h]`` for k
members), so the schedule only needs ``micro_batch_size = k * mb`` (`pipeline_micro_batch_size`) and
the value network / reference must have the policy's hidden size (they are copies of its
architecture). On the last stage the output is ``[b, s_local, 3]``: per token, the policy's
log-prob of the label (fused from hidden states, never materializing the logits), the value
``V(s_h)`` and the reference log-prob (NaN when the reference comes from the data), whole along SP,
this rank's part along CP.

Value modes: "separate" (a second GPT + `ValueHead`, the paper's setting) or "shared" (the head on the
policy's final hidden states).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from dqo_megatron.logprobs import gather_from_sequence_parallel, output_weight, token_logprobs_from_hidden
from dqo_megatron.models.value_head import VALUE_HEAD_ATTR, ValueHead, final_hidden_states_only, unwrap_gpt
from dqo_megatron.parallel import unwrap

logger = logging.getLogger(__name__)

LOGP, VALUE, REF_LOGP = 0, 1, 2
"""Indices of the last dimension of `PolicyValueModel`'s output on the last stage."""


MEMBERS = ("policy", "value", "reference")
"""The member attributes a `PolicyValueModel` may hold, in checkpoint-key order."""


class PolicyValueModel(torch.nn.Module):
    """Policy (+ value network or head) (+ frozen reference) of one pipeline (virtual) stage.

    Args:
        policy: the policy GPTModel chunk.
        value: the value GPTModel chunk (value mode "separate"), or None.
        reference: a frozen reference GPTModel chunk, or None (reference log-probs from the data).
        value_head: True to put a value head on the last stage: on `value` when given, else on the
            policy's trunk (value mode "shared"). False: no value (SFT, RS, DPO, KTO).
        head_init_std: std of the head's weight init (0: zero).
        offload_reference: keep the reference on the CPU between its forwards.
        vocab_size: the real vocabulary (`model.vocab_size`); the output layer's padding rows past it
            get no probability mass in the log-probs (None: no padding to exclude).
    """

    def __init__(
        self,
        policy,
        value=None,
        reference=None,
        *,
        value_head: bool = True,
        head_init_std: float = 0.0,
        offload_reference: bool = False,
        vocab_size: int | None = None,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.policy = policy
        self.value = value
        self.reference = reference
        self.offload_reference = offload_reference and reference is not None
        self.config = policy.config
        gpt = unwrap_gpt(policy)
        self.model_type = gpt.model_type  # read by Megatron's schedules
        self.vp_stage = getattr(gpt, "vp_stage", None)
        if reference is not None:
            reference.requires_grad_(False)
        if value is not None:
            if value.config.hidden_size != policy.config.hidden_size:
                raise ValueError("the value network must have the policy's hidden size (stages exchange both)")
            value_gpt = unwrap_gpt(value)
            if value_gpt.post_process and not value_gpt.share_embeddings_and_output_weights:
                value_gpt.output_layer.weight.requires_grad_(False)  # the value network never computes logits
            for param in value.parameters():
                setattr(param, VALUE_HEAD_ATTR, True)  # its own optimizer group (learning rate)
        # Packed rows run as THD on any attention but our local spec's (Transformer Engine's).
        from dqo_megatron.models.packed import masks_documents

        self.thd_packing = not masks_documents(policy)
        self.value_head = None
        if value_head and unwrap_gpt(policy).post_process:
            trunk = value if value is not None else policy
            self.value_head = ValueHead.from_config(trunk.config, init_std=head_init_std)

    @property
    def members(self) -> list:
        """The GPT chunks whose hidden states travel between stages, in a fixed order."""
        return [m for m in (self.policy, self.value, self.reference) if m is not None]

    # Megatron's finalize_model_grads all-reduces ONE tied embedding between the first and last
    # stages; with several members we do it per member in `finalize_policy_value_grads`.
    share_embeddings_and_output_weights = False

    @property
    def pre_process(self) -> bool:
        """Whether this chunk is the first pipeline (virtual) stage."""
        return unwrap_gpt(self.policy).pre_process

    @property
    def post_process(self) -> bool:
        """Whether this chunk is the last pipeline (virtual) stage."""
        return unwrap_gpt(self.policy).post_process

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedule hands each stage the previous stage's output; split it per member."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        members = self.members
        if input_tensor is None:
            parts = [None] * len(members)
        else:
            parts = torch.chunk(input_tensor, len(members), dim=1)
        for member, part in zip(members, parts):
            member.set_input_tensor(part)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Megatron's checkpoint interface: each member's GPT keys under ``<prefix>policy.`` /
        ``value.`` / ``reference.`` and the replicated head under ``<prefix>value_head.``
        (`members_sharded_state_dict`)."""
        return members_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, position_ids, labels: ``[b, s_local]`` (this CP rank's part).

        Packed rows: `document_ids` ``[b, s]`` the document of every input token of the WHOLE rows
        (-1 on padding) and `position_ids` restarting in every document. On the local spec attention
        then stops at document boundaries (`models.packed.document_attention_mask`, CP-aware) and RoPE
        reads `position_ids`; on Transformer Engine the rows run as Megatron's THD format (untested).
        Returns ``[b, s_local, 3]`` (log pi, V, log pi_ref) on the last stage, else the stacked hidden
        states ``[s_local(/tp), k*b, h]`` for the next stage.
        """
        from dqo_megatron.models.packed import rotary_from_position_ids, this_rank_document_mask

        if document_ids is None:
            hidden = self._member_states(tokens, position_ids, None, lambda member: contextlib.nullcontext())
        elif self.thd_packing:
            return self._thd_forward(tokens, position_ids, labels, document_ids)
        else:
            mask = this_rank_document_mask(document_ids)
            hidden = self._member_states(
                tokens, position_ids, mask, lambda member: rotary_from_position_ids([unwrap_gpt(member)], position_ids)
            )
        if not self.post_process:
            return torch.cat(hidden, dim=1)
        return self._per_token_outputs(hidden, labels)

    def _member_states(self, tokens, position_ids, attention_mask, rope, **kwargs) -> list:
        """Each member's output on this stage (final hidden states on the last); `rope(member)`: the
        context its forward runs in."""
        hidden = []
        for member in self.members:
            grad = contextlib.nullcontext() if member is not self.reference else torch.no_grad()
            offload = member is self.reference and self.offload_reference
            if offload:
                member.to(tokens.device)
            with grad, rope(member), final_hidden_states_only(member):
                hidden.append(member(tokens, position_ids, attention_mask, **kwargs))
            if offload and not self.post_process:  # on the last stage it still computes log-probs below
                member.to("cpu")
        return hidden

    def check_packing_supported(self) -> None:
        """ConfigError when packed rows cannot run on this model chunk: Transformer Engine's THD path
        (`_thd_forward`) under context or pipeline parallelism (docs/packing.md, what remains)."""
        from megatron.core import parallel_state

        from dqo_megatron.config import ConfigError

        cp = parallel_state.get_context_parallel_world_size()
        if self.thd_packing and (cp > 1 or not (self.pre_process and self.post_process)):
            raise ConfigError(
                "train.packing=true on the Transformer Engine layer spec (packed rows as THD) is not supported "
                "with parallel.context_parallel_size > 1 or parallel.pipeline_model_parallel_size > 1 yet: "
                "set train.packing=false (docs/packing.md)"
            )

    def _thd_forward(self, tokens, position_ids, labels, document_ids) -> torch.Tensor:
        """Packed rows on Transformer Engine: flattened to one sequence ``[1, b*s]`` with THD
        `PackedSeqParams`, so TE's attention and Megatron's RoPE restart per document. UNTESTED (no
        GPU has run it); refused under CP and PP (docs/packing.md)."""
        from dqo_megatron.models.packed import thd_packed_seq_params

        self.check_packing_supported()
        b, s = tokens.shape
        params = thd_packed_seq_params(document_ids)
        flat = [t.reshape(1, b * s) for t in (tokens, position_ids, labels)]
        hidden = self._member_states(
            flat[0], flat[1], None, lambda member: contextlib.nullcontext(), packed_seq_params=params
        )
        return self._per_token_outputs(hidden, flat[2]).reshape(b, s, -1)

    def _per_token_outputs(self, hidden: list, labels: torch.Tensor) -> torch.Tensor:
        config = self.config
        sp = config.sequence_parallel
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
        named = dict(zip([id(m) for m in self.members], hidden))
        policy_hidden = named[id(self.policy)]
        weight = output_weight(self.policy)
        # Untied output weight under Megatron DDP: add dW straight into its fp32 buffer (as Megatron's
        # gradient-accumulation fusion does) instead of materializing a [V/tp, h] gradient. A tied
        # weight also gets the embedding's gradient through .grad, so it keeps the ordinary path.
        into_main_grad = (
            getattr(weight, "main_grad", None) is not None
            and torch.is_grad_enabled()
            and not unwrap_gpt(self.policy).share_embeddings_and_output_weights
        )
        logp = token_logprobs_from_hidden(
            policy_hidden,
            weight,
            labels,
            tp_group=tp_group,
            sequence_parallel=sp,
            accumulate_into_main_grad=into_main_grad,
            vocab_size=self.vocab_size,
        )
        values = torch.zeros_like(logp)
        if self.value_head is not None:
            trunk_hidden = named[id(self.value)] if self.value is not None else policy_hidden
            values = self.value_head(trunk_hidden)
            if sp:
                values = gather_from_sequence_parallel(values, tp_group, dim=1)
        ref = torch.full_like(logp, float("nan"))
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs_from_hidden(
                    named[id(self.reference)].detach(),
                    output_weight(self.reference),
                    labels,
                    tp_group=tp_group,
                    sequence_parallel=sp,
                    vocab_size=self.vocab_size,
                )
            if self.offload_reference:
                self.reference.to("cpu")
        return torch.stack([logp, values, ref], dim=-1)


def members_sharded_state_dict(
    model, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
) -> dict:
    """Sharded state dict of a `PolicyValueModel`: its members' GPT keys under ``<prefix><member>.``,
    the value head (``weight [1, h]``, ``bias [1]``, replicated over TP and DP/CP, present on the last
    pipeline stage only) as plain ShardedTensors under ``<prefix>value_head.``."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = {}
    for name in MEMBERS:
        member = getattr(model, name, None)
        if member is not None:
            state.update(
                member.sharded_state_dict(prefix=f"{prefix}{name}.", sharded_offsets=sharded_offsets, metadata=metadata)
            )
    if getattr(model, "value_head", None) is not None:
        head = model.value_head.state_dict(keep_vars=True)
        # No TP axis: every TP/DP/CP rank holds the whole head; replica ids make one rank save it.
        state.update(make_sharded_tensors_for_checkpoint(head, f"{prefix}value_head.", {}, sharded_offsets))
    return state


def load_members_state(model, state: dict) -> None:
    """Load a `members_sharded_state_dict`-shaped `state` member by member (strict; RuntimeError on a
    mismatch): members may be wrapped in Float16Module, whose parameter names carry an extra
    ``module.`` the checkpoint keys lack."""
    from megatron.core.utils import unwrap_model

    for name in MEMBERS:
        member = getattr(model, name)
        if member is not None:
            sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            unwrap_model(member).load_state_dict(sub, strict=True)
    if model.value_head is not None:
        sub = {k[len("value_head.") :]: v for k, v in state.items() if k.startswith("value_head.")}
        model.value_head.load_state_dict(sub, strict=True)


def finalize_policy_value_grads(model: list, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Megatron's `finalize_model_grads`, plus the tied-embedding gradient all-reduce between the first
    and last pipeline stages for every member with tied embeddings (Megatron's handles one model)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_embedding_group()
    if torch.distributed.get_rank() not in torch.distributed.get_process_group_ranks(group):
        return
    outer = model[0] if parallel_state.is_pipeline_first_stage(ignore_virtual=True) else model[-1]
    chunk = unwrap(outer, lambda m: isinstance(m, PolicyValueModel), "PolicyValueModel")
    for member in (chunk.policy, chunk.value):
        gpt = unwrap_gpt(member) if member is not None else None
        if gpt is not None and gpt.share_embeddings_and_output_weights:
            weight = gpt.shared_embedding_or_output_weight()
            grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
            torch.distributed.all_reduce(grad, group=group)


def pipeline_micro_batch_size(model: "PolicyValueModel | torch.nn.Module", micro_batch_size: int) -> int:
    """The micro-batch size to give Megatron's schedule: members stack along the batch dimension."""
    inner = unwrap(model, lambda m: isinstance(m, PolicyValueModel) or not hasattr(m, "module"), "model")
    return micro_batch_size * (len(inner.members) if isinstance(inner, PolicyValueModel) else 1)  # bare GPT: one


def with_resolved_packing(run, *, log: bool = False):
    """`run` (a `RunConfig`) with `train.packing` resolved for the layer spec the models are built with
    (`select_backend("auto")`, as `build_policy_value_chunks`): unset (auto) is on for the local spec
    and off for Transformer Engine's (`TrainConfig.resolved_packing`); true / false stay. A copy; the
    trainer and annotate call it once at start, so config.yaml, W&B and the checkpoints record the
    choice. `log`: say which (rank 0)."""
    import copy

    from dqo_megatron.models import select_backend

    requested = run.train.packing
    if requested is not None and not log:
        return run
    spec = select_backend("auto")
    packing = run.train.resolved_packing(spec)
    if log:
        if requested is not None:
            why = f"train.packing={str(requested).lower()}"
        elif spec == "local":
            why = "auto: on for the local layer spec, tested equal to unpacked"
        else:
            why = "auto: off on Transformer Engine's layer spec, whose THD path has not run on a GPU yet"
        logger.info("packing: %s (%s; docs/packing.md)", "on" if packing else "off", why)
    resolved = copy.copy(run)  # not dataclasses.replace: no second validation of a config already checked
    resolved.train = copy.copy(run.train)
    resolved.train.packing = packing
    return resolved


def build_policy_value_chunks(run, *, with_value: bool, with_reference: bool, backend: str = "auto") -> list:
    """This rank's `PolicyValueModel` chunk(s) for `run` (a `RunConfig`), on this process's device.

    The value network (value mode "separate") and the reference are GPTs of the policy's
    architecture; every member is split with the same TP/PP/CP layout. A reference held in the run
    stays on the CPU between uses when `run.data.reference_offload`.
    """
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.parallel import device_for_this_process

    policies = build_model_chunks(run.model, run.parallel, run.precision, backend=backend)
    separate = with_value and run.value.mode == "separate"
    values = (
        build_model_chunks(run.model, run.parallel, run.precision, backend=backend)
        if separate
        else [None] * len(policies)
    )
    refs = (
        build_model_chunks(run.model, run.parallel, run.precision, backend=backend)
        if with_reference
        else [None] * len(policies)
    )
    device = device_for_this_process()
    chunks = [
        _placed(
            PolicyValueModel(
                policy,
                value,
                reference,
                value_head=with_value,
                head_init_std=run.value.head_init_std,
                offload_reference=run.data.reference_offload,
                vocab_size=run.model.vocab_size,
            ),
            device,
        )
        for policy, value, reference in zip(policies, values, refs)
    ]
    if run.train.packing:  # refused before any weights load, not at the first step
        for chunk in chunks:
            chunk.check_packing_supported()
    return chunks


def _placed(chunk: PolicyValueModel, device) -> PolicyValueModel:
    chunk.to(device)
    if chunk.offload_reference:
        chunk.reference.to("cpu")
    return chunk
