"""LangChain pieces over a trained checkpoint or an export (optional: needs `langchain-core`): its retriever, its
generator as a chat model, and the RAG chain retriever -> prompt -> generator of the two (or of any LangChain
retriever and chat model).

    from rag_end2end.deploy.langchain import CheckpointChatModel, CheckpointRetriever, rag_chain, rag_chain_from_path
    retriever = CheckpointRetriever.from_path("OUT/checkpoint120", k=4)
    docs = retriever.invoke("What is the incubation period?")   # Documents: page_content = the passage text,
    docs[0].metadata                                             # {"id": KB row, "title": ..., "score": ...}
    chain = rag_chain_from_path("OUT/checkpoint120")             # question -> answer, as rag_answer.py answers
    chain.invoke("What is the incubation period?")
    rag_chain(retriever, ChatOllama(model="llama3.2")).invoke("What is the incubation period?")  # any chat model

The retriever encodes the query with the trained question encoder (its prefix, pooling, similarity and tau) and
searches the KB version the checkpoint names, in this process (no Ray); the score is similarity / tau against the
KB's stored passage vector (what FAISS ranks by; recipes that re-encode passages score them afresh in training).
Nothing is unpickled: the KB loads as Arrow and a FAISS index.

The generator was trained on its own prompts (one per passage, its template) mixed by the passages' doc scores (RAG's
marginal), not on one prompt holding every passage: the chain's prompt step (`rag_prompt`) therefore writes one
message that any chat model reads as text (the passages, then the question) and attaches the question and passages
themselves, which `CheckpointChatModel` decodes from as `RagModel.answer` does (the run's template, marginal and
decoding; a passage without a `score` in its metadata counts as 0, so passages of another retriever weigh alike).
"""

from __future__ import annotations

from typing import Any

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough

from rag_end2end.model.rag import RagModel

PROMPT = "Answer the question from these passages.\n\n{passages}\n\nQuestion: {question}"  # what other models read
PASSAGES_KEY = "rag_passages"  # where rag_prompt attaches the passages (the message's additional_kwargs)
QUESTION_KEY = "rag_question"


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class CheckpointRetriever(BaseRetriever):
    """The trained retriever of a checkpoint (or export) as a LangChain `BaseRetriever`."""

    model: Any  # a rag_model.RagModel with a retriever attached
    k: int = 4

    def __init__(self, **fields: Any):
        super().__init__(**fields)
        _check_k(self.k, self.model)  # a plain one-line ValueError, not pydantic's report

    @classmethod
    def from_path(cls, path: str, k: int = 4, kb: tuple[str, str] | None = None) -> CheckpointRetriever:
        """The question encoder of `path` over its KB version (or `kb`: passages, index); no generator."""
        model = RagModel.from_pretrained(path, load_generator=False, load_context_encoder=False, kb=kb).eval()
        return cls(model=model, k=k)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        _check_k(self.k, self.model)  # k may have been set after construction
        with torch.no_grad():  # RagModel's own retrieval, over the stored vectors
            r = self.model.retrieve(**self.model.tokenize_questions([query]), n_docs=self.k)
        found = zip(r.ids[0], r.docs[0]["title"], r.docs[0]["text"], r.doc_scores[0].tolist())
        return [  # best first (fresh doc scores may rank re-encoded passages otherwise than the index)
            Document(page_content=text, id=str(int(i)), metadata={"id": int(i), "title": title, "score": float(s)})
            for i, title, text, s in sorted(found, key=lambda hit: -hit[3])
        ]


def _check_k(k: int, model: RagModel) -> None:
    size = len(model.retriever) if model.retriever is not None and hasattr(model.retriever, "__len__") else None
    if not isinstance(k, int) or k < 1 or (size is not None and k > size):
        raise ValueError(f"k={k!r}: passages per query must be an integer from 1 to the KB's size ({size or '?'})")


def rag_prompt(inputs: dict) -> ChatPromptValue:
    """The chain's prompt step: {"question": str, "context": [Document]} -> one human message, PROMPT with the
    passages ("title / text", best first) and the question, that carries both in its additional_kwargs too (what
    CheckpointChatModel decodes from; other chat models read the text)."""
    question, docs = inputs["question"], inputs["context"]
    passages = [
        {
            "title": str(d.metadata.get("title") or ""),
            "text": d.page_content,
            "score": float(d.metadata.get("score") or 0.0),
        }
        for d in docs
    ]
    text = PROMPT.format(
        passages="\n\n".join(f"{p['title']} / {p['text']}" if p["title"] else p["text"] for p in passages),
        question=question,
    )
    message = HumanMessage(content=text, additional_kwargs={PASSAGES_KEY: passages, QUESTION_KEY: question})
    return ChatPromptValue(messages=[message])


class CheckpointChatModel(BaseChatModel):
    """The trained generator of a checkpoint (or export) as a LangChain chat model. From `rag_prompt`'s message it
    answers the question from the attached passages; from any other messages it takes the last human message as
    the question and retrieves its passages from the checkpoint's KB first (RagModel.answer). Decoding is the
    run's (`max_new_tokens`, `num_beams` override it); `stop` strings cut the answer."""

    model: Any  # a rag_model.RagModel with a generator (and, to answer bare questions, a retriever)
    max_new_tokens: int | None = None
    num_beams: int | None = None

    def __init__(self, **fields: Any):
        super().__init__(**fields)
        if self.model.generator is None:
            raise ValueError("this checkpoint has no generator (retriever_only): give rag_chain another chat model")

    @classmethod
    def from_path(
        cls, path: str, kb: tuple[str, str] | None = None, device: str | None = None, **decoding: Any
    ) -> CheckpointChatModel:
        """The model of `path` (its generator, question encoder and KB version, or `kb`: passages, index) on
        `device` (default: cuda if available)."""
        return cls(model=RagModel.from_pretrained(path, kb=kb).to(_device(device)).eval(), **decoding)

    @property
    def _llm_type(self) -> str:
        return "rag-end2end-checkpoint"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        asked = [m for m in messages if isinstance(m, HumanMessage)]
        if not asked:
            raise ValueError("no human message: the question is the last human message")
        last = asked[-1]
        g = self.model.generation.decoding(self.max_new_tokens, self.num_beams)
        with torch.no_grad():
            if PASSAGES_KEY in last.additional_kwargs:
                passages = last.additional_kwargs[PASSAGES_KEY]
                if not passages:
                    raise ValueError("the prompt holds no passages: the retriever found none")
                docs = [{"title": [p["title"] for p in passages], "text": [p["text"] for p in passages]}]
                scores = torch.tensor([[p["score"] for p in passages]], device=self.model.generator.device)
                question = last.additional_kwargs[QUESTION_KEY]
                answer = self.model.generator.generate(
                    [question], docs, scores, g.max_new_tokens, self.model.marginal, g.num_beams
                )[0]
            elif self.model.retriever is None:
                raise ValueError("no passages in the prompt and no KB to retrieve from: use rag_prompt's message")
            else:
                answer = self.model.answer([str(last.text)], g.max_new_tokens, g.num_beams)[0]["answer"]
        for s in stop or []:
            answer = answer.split(s)[0]
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=answer))])


def rag_chain(retriever: BaseRetriever, model: BaseChatModel, with_sources: bool = False) -> Runnable:
    """retriever -> rag_prompt -> model -> the answer's text: question (str) in, answer (str) out, or with
    `with_sources` a dict of the question, the passages (`context`, Documents) and the `answer`."""
    retrieval = RunnableParallel(context=retriever, question=RunnablePassthrough())
    answer = RunnableLambda(rag_prompt) | model | StrOutputParser()
    return retrieval.assign(answer=answer) if with_sources else retrieval | answer


def rag_chain_from_path(
    path: str,
    k: int | None = None,
    model: BaseChatModel | None = None,
    kb: tuple[str, str] | None = None,
    device: str | None = None,
    with_sources: bool = False,
) -> Runnable:
    """rag_chain over the checkpoint (or export) `path`, loaded once: its retriever (`k` passages, default the run's
    n_docs) and its generator, or `model` (any chat model; the checkpoint's generator is then not loaded)."""
    rag = RagModel.from_pretrained(path, kb=kb, load_generator=model is None).to(_device(device)).eval()
    retriever = CheckpointRetriever(model=rag, k=k if k is not None else rag.n_docs)
    return rag_chain(retriever, model or CheckpointChatModel(model=rag), with_sources)
