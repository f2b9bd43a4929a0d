"""docs/benchmarks.md's tables are generated from the benchmark records."""
import json

import pytest

from experiments import bench_table


def test_page_shows_exactly_the_records():
  text = bench_table.PAGE.read_text()
  generated = text.split(bench_table.BEGIN)[1].split(bench_table.END)[0]
  assert generated.strip() == bench_table.markdown(bench_table.records())
  for record in bench_table.records():  # one record per benchmark and CPU
    assert bench_table.record_path(record).exists()


def test_every_record_has_a_row():
  records = bench_table.records()
  page = bench_table.markdown(records)
  for record in records:
    if bench_table.kind(record) == 'lora':
      for row in bench_table.train_rows(record):
        assert row in page
    else:
      assert bench_table.generate_row(record) in page


def test_add_refuses_what_no_benchmark_wrote(tmp_path):
  other = tmp_path / 'summary.json'
  other.write_text(json.dumps({'eval_accuracy': 0.9}))
  with pytest.raises(ValueError, match='not the JSON of `experiments'):
    bench_table.add(str(other))
  undated = tmp_path / 'old_bench.json'
  undated.write_text(json.dumps({'configs': {}, 'summary': {}}))
  with pytest.raises(ValueError, match='no date, commit or hardware'):
    bench_table.add(str(undated))
  with pytest.raises(ValueError, match='--add=.*missing.json'):
    bench_table.add(str(tmp_path / 'missing.json'))


def test_page_without_markers_is_refused_untouched(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('# Benchmarks\n')
  with pytest.raises(ValueError, match='no <!-- bench_table: begin -->'):
    bench_table.write_page(page)
  assert page.read_text() == '# Benchmarks\n'
