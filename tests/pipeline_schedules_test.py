"""Pipeline schedules: complete and dependency-respecting, bubbles against the published formulas, memory."""

from absl.testing import absltest, parameterized

from deepseek_jax import pipeline_schedules as ps


class ScheduleTest(parameterized.TestCase):

  @parameterized.product(n_devices=(2, 4, 8), n_micro=(1, 4, 8, 20), name=('gpipe', '1f1b', 'dualpipev'))
  def test_every_op_once_after_its_inputs(self, n_devices, n_micro, name):
    if name == 'dualpipev' and n_micro < 2 * n_devices:
      with self.assertRaisesRegex(ValueError, 'at least'):
        ps.dualpipe_v(n_devices, n_micro)
      return
    schedule = ps.SCHEDULES[name](n_devices, n_micro)
    ps.check(schedule)
    tick = {}
    for t, row in enumerate(ps.timetable(schedule)):
      for d, slot in enumerate(row):
        for op in slot or ():
          self.assertEqual(schedule.placement[op.chunk], d)
          tick[op] = t
    for op, t in tick.items():
      for kind, chunk, micro in ps.needs(op, schedule.n_chunks):
        done = [tick[ps.Op(k, chunk, micro)] for k in kind if ps.Op(k, chunk, micro) in tick]
        self.assertLen(done, 1)
        self.assertLess(done[0], t)

  @parameterized.product(n_devices=(2, 4, 8), n_micro=(1, 4, 8, 20), b=(1.0, 2.0))
  def test_1f1b_and_gpipe_bubble_is_p_minus_1_times_f_plus_b(self, n_devices, n_micro, b):
    for make in (ps.gpipe, ps.one_f_one_b):
      makespan, idle = ps.simulate(make(n_devices, n_micro), {'F': 1.0, 'B': b, 'W': 0.0})
      for device_idle in idle:
        self.assertAlmostEqual(device_idle, (n_devices - 1) * (1.0 + b))
      self.assertAlmostEqual(makespan, (n_micro + n_devices - 1) * (1.0 + b))

  @parameterized.product(n_devices=(2, 4, 8), micro_per_device=(2, 3, 5), w=(0.0, 0.5), overlap=(0.0, 0.5))
  def test_dualpipev_bubble_formula(self, n_devices, micro_per_device, w, overlap):
    # (PP / 2 - 1)(F&B + B - 3W), PP = 2 x devices chunks, B = 2F, for any M >= 2P (it does not grow with M):
    # the most idle device waits between that minus one F and that (exactly minus F from 4 devices on).
    costs = {'F': 1.0, 'B': 2.0, 'W': w, 'F&B': 3.0 - overlap}
    _, idle = ps.simulate(ps.dualpipe_v(n_devices, micro_per_device * n_devices), costs)
    formula = (n_devices - 1) * (costs['F&B'] + costs['B'] - 3 * costs['W'])
    self.assertBetween(max(idle), formula - costs['F'] - 1e-9, formula + 1e-9)
    if n_devices >= 4:
      self.assertAlmostEqual(max(idle), formula - costs['F'])
    # Half the 1F1B bubble of the same P devices (its stage = 2 chunks: F and B twice as long).
    _, one_f_one_b_idle = ps.simulate(ps.one_f_one_b(n_devices, micro_per_device * n_devices),
                                      {'F': 2.0, 'B': 4.0, 'W': 0.0})
    self.assertLess(max(idle), 0.9 * one_f_one_b_idle[0])

  def test_activations_held(self):
    for n_devices, n_micro in ((4, 8), (8, 20), (8, 4)):
      table = ps.timetable(ps.one_f_one_b(n_devices, n_micro))
      self.assertEqual(ps.peak_activations(table), [min(n_devices - d, n_micro) for d in range(n_devices)])
      self.assertEqual(ps.peak_activations(ps.timetable(ps.gpipe(n_devices, n_micro))), [n_micro] * n_devices)
      # DualPipeV: PP + 1 chunk activations (PP = 2P chunks), not growing with M (DualPipe README table).
      if n_micro >= 2 * n_devices:
        self.assertEqual(ps.peak_activations(ps.timetable(ps.dualpipe_v(n_devices, n_micro))),
                         [2 * n_devices + 1] * n_devices)

  def test_dualpipev_places_embedding_head_and_mtp_together(self):
    schedule = ps.dualpipe_v(4, 8)
    self.assertEqual(schedule.placement, (0, 1, 2, 3, 3, 2, 1, 0))  # first and last chunk on device 0
    self.assertEqual(schedule.local_chunks(1), [1, 6])

  def test_deadlock_is_reported(self):
    bad = ps.Schedule('bad', 2, 1, (0, 1), (((ps.Op('B', 0, 0),), (ps.Op('F', 0, 0),)),
                                             ((ps.Op('F', 1, 0),), (ps.Op('B', 1, 0),))))
    with self.assertRaisesRegex(ValueError, 'deadlocks'):
      ps.timetable(bad)
    with self.assertRaisesRegex(ValueError, 'deadlocks'):
      ps.simulate(bad, {'F': 1.0, 'B': 1.0, 'W': 0.0})


if __name__ == '__main__':
  absltest.main()
