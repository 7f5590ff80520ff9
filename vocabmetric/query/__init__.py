"""Job 2, querying a metric: terminal tables (:mod:`.report`), quality against human
judgments (:mod:`.evaluation`), pictures (:mod:`.plots`) and the HTTP ground-cost service
with its explorer and client (:mod:`.service`). All of it reads a store through
:class:`vocabmetric.store.MetricStore`.
"""
