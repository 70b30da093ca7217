"""Explanations of SAE latents and their similarity across seeds (paper A's explanation figure).

Paper A explains every latent of two seeds' SAEs from its top-activating contexts with an LLM and
has an LLM rate the two explanations of each matched pair from 1 to 10; consistent pairs (high
decoder cosine) get similar explanations. This module is the one import for that pipeline:

1. ``top_contexts(codes, x, latents)`` — stream the activation cache once, keep per latent the top
   contexts and samples across activation quantiles (``paperlib.explain.contexts``); ``.examples(
   TokenContexts.from_activations(acts))`` makes them readable (activating token marked «so»).
2. ``explain_latents(explainer, examples, run_id)`` — one explanation per latent, cached and
   resumable, from ``LocalExplainer`` (packaged SmolLM2-135M-Instruct, offline, weak),
   ``ChatEndpointExplainer`` (any OpenAI-compatible endpoint) or ``TopTokensExplainer`` (baseline)
   (``paperlib.explain.explainers``, backends in ``paperlib.explain.chat``).
3. ``EmbeddingSimilarity`` (all-MiniLM-L6-v2 cosine, default) or ``JudgeSimilarity`` (LLM judge
   1..10, paper A's measure) of the two explanations of each matched pair, binned by decoder
   cosine with paper A's edges (``bin_scores``) and ``random_pairs`` for the chance level
   (``paperlib.explain.similarity``); Spearman's ρ with a bootstrap interval is
   ``paperlib.metrics.stats.spearman``.
"""

from paperlib.explain.chat import (
    ChatBackend,
    ChatEndpoint,
    EndpointConfig,
    EndpointError,
    LocalChat,
    MalformedReply,
    PartialFailure,
)
from paperlib.explain.contexts import Example, LatentExamples, TokenContexts, TopContexts, top_contexts
from paperlib.explain.explainers import (
    LOCAL_PROMPT,
    PROMPT_VERSION,
    ChatEndpointExplainer,
    ExplainPrompt,
    Explainer,
    LLMExplainer,
    LocalExplainer,
    TopTokensExplainer,
    clean_explanation,
    explain_latents,
    explanation_cache,
)
from paperlib.explain.similarity import (
    JUDGE_PROMPT_VERSION,
    PAPER_A_EDGES,
    PAPER_A_JUDGE_MEANS,
    BinnedScores,
    EmbeddingSimilarity,
    JudgeSimilarity,
    bin_scores,
    parse_score,
    random_pairs,
    stratified_pairs,
)

__all__ = [
    "ChatBackend",
    "ChatEndpoint",
    "EndpointConfig",
    "EndpointError",
    "LocalChat",
    "MalformedReply",
    "PartialFailure",
    "Example",
    "LatentExamples",
    "TokenContexts",
    "TopContexts",
    "top_contexts",
    "LOCAL_PROMPT",
    "PROMPT_VERSION",
    "ChatEndpointExplainer",
    "ExplainPrompt",
    "Explainer",
    "LLMExplainer",
    "LocalExplainer",
    "TopTokensExplainer",
    "clean_explanation",
    "explain_latents",
    "explanation_cache",
    "JUDGE_PROMPT_VERSION",
    "PAPER_A_EDGES",
    "PAPER_A_JUDGE_MEANS",
    "BinnedScores",
    "EmbeddingSimilarity",
    "JudgeSimilarity",
    "bin_scores",
    "parse_score",
    "random_pairs",
    "stratified_pairs",
]
