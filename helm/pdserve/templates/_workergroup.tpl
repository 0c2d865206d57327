{{/*
One worker group of the RayCluster. Called with (dict "root" $ "role" "prefill"|"decode").

Each pod runs `ray start` only; the gateway's controller places one pdserve worker actor on
it through the Ray custom resource named after the role (the actor asks for {role: 1} and
one CPU), so a pending worker makes the Ray autoscaler add a pod to this group and to no
other.
*/}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $g := index $root.Values $role }}
{{- $params := dict "num-cpus" (toString $g.numCpus) "resources" (include "pdserve.rayResources" (dict "role" $role)) }}
{{- if gt (int $g.gpus) 0 }}
{{- $_ := set $params "num-gpus" (toString $g.gpus) }}
{{- end }}
{{- $params = merge $params (deepCopy (default dict $g.rayStartParams)) }}
- groupName: {{ $role }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if not (kindIs "invalid" $g.idleTimeoutSeconds) }}
  idleTimeoutSeconds: {{ $g.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    {{- range $key, $value := $params }}
    {{ $key }}: {{ toString $value | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "pdserve.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $root.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        # KubeRay treats the first container as the Ray container.
        - name: ray-worker
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          # KubeRay puts the `ray start` command it generates (address of the head, the
          # rayStartParams above, --block) in KUBERAY_GEN_RAY_START_CMD; eval applies the
          # shell quoting inside it, e.g. around the resources JSON.
          command: ["/bin/bash", "-c"]
          args:
            - >-
              ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}" || true;
              eval "exec ${KUBERAY_GEN_RAY_START_CMD}"
          {{- with $g.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- $resources := deepCopy (default dict $g.resources) }}
            {{- if gt (int $g.gpus) 0 }}
            {{- $_ := set $resources "requests" (merge (default dict $resources.requests) (dict "nvidia.com/gpu" (int $g.gpus))) }}
            {{- $_ := set $resources "limits" (merge (default dict $resources.limits) (dict "nvidia.com/gpu" (int $g.gpus))) }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          # The raylet's health, as the Ray dashboard agent reports it.
          readinessProbe:
            httpGet:
              path: /api/local_raylet_healthz
              port: 52365
            initialDelaySeconds: 10
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 10
          livenessProbe:
            httpGet:
              path: /api/local_raylet_healthz
              port: 52365
            initialDelaySeconds: 30
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 6
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with include "pdserve.workerVolumeMounts" $root }}
          volumeMounts:
            {{- . | nindent 12 }}
          {{- end }}
      {{- with include "pdserve.workerVolumes" $root }}
      volumes:
        {{- . | nindent 8 }}
      {{- end }}
{{- end }}
