"""Pipeline timetables: dependencies respected, bubbles equal to the published formulas, 1F1B's memory bound."""

from absl.testing import absltest, parameterized

from deepseek_jax import pipeline_schedules as ps


class ScheduleTest(parameterized.TestCase):

  @parameterized.product(n_stages=(2, 4, 8), n_micro=(1, 4, 8, 20), schedule=('gpipe', '1f1b'))
  def test_timetable_bubble_and_dependencies(self, n_stages, n_micro, schedule):
    orders = (ps.gpipe if schedule == 'gpipe' else ps.one_f_one_b)(n_stages, n_micro)
    table = ps.timetable(orders)
    # Every microbatch's forward and backward on every stage, once.
    ran = sorted((op.kind, op.micro, s) for row in table for s, op in enumerate(row) if op is not None)
    self.assertEqual(ran, sorted((k, i, s) for k in 'FB' for i in range(n_micro) for s in range(n_stages)))
    tick = {(op.kind, op.micro, s): t for t, row in enumerate(table) for s, op in enumerate(row) if op}
    for i in range(n_micro):
      for s in range(n_stages):
        if s:
          self.assertLess(tick['F', i, s - 1], tick['F', i, s])
        if s < n_stages - 1:
          self.assertLess(tick['B', i, s + 1], tick['B', i, s])
        self.assertLess(tick['F', i, s], tick['B', i, s])
    # Equal F and B times: 2 (M + P - 1) ticks, bubble (P - 1) / (M + P - 1) for both (Narayanan et al.).
    self.assertLen(table, 2 * (n_micro + n_stages - 1))
    self.assertAlmostEqual(ps.bubble_fraction(table), (n_stages - 1) / (n_micro + n_stages - 1))

  def test_1f1b_holds_at_most_p_minus_s_microbatches(self):
    for n_stages, n_micro in ((4, 8), (8, 20), (8, 4)):
      peaks = ps.peak_activations(ps.timetable(ps.one_f_one_b(n_stages, n_micro)))
      self.assertEqual(peaks, [min(n_stages - s, n_micro) for s in range(n_stages)])
      self.assertEqual(ps.peak_activations(ps.timetable(ps.gpipe(n_stages, n_micro))), [n_micro] * n_stages)

  def test_lockstep_ticks_with_slower_backwards(self):
    # B = 2F: ticks that mix F and B last 2; the bubble grows past the asynchronous formula, which a
    # lockstep engine cannot reach.
    table = ps.timetable(ps.one_f_one_b(4, 8))
    lockstep = ps.bubble_fraction(table, {'F': 1.0, 'B': 2.0})
    asynchronous = 3 * 3 / (8 * 3 + 3 * 3)  # (P - 1)(F + B) / (M (F + B) + (P - 1)(F + B))
    self.assertGreater(lockstep, asynchronous)
    self.assertLess(lockstep, 0.5)

  def test_deadlock_is_reported(self):
    with self.assertRaisesRegex(ValueError, 'deadlocks'):
      ps.timetable([[ps.Op('B', 0), ps.Op('F', 0)], [ps.Op('F', 0), ps.Op('B', 0)]])


if __name__ == '__main__':
  absltest.main()
