"""A corpus: its sources read as documents (one reader per format) and tokenized into shards."""
from .shards import CorpusStats as CorpusStats, tokenize_corpus as tokenize_corpus
from .sources import (FORMATS as FORMATS, Document as Document, expand_sources as expand_sources,
                      iter_documents as iter_documents, source_format as source_format)
